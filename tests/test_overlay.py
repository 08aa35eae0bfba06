"""Any model saved and loaded (sparsevd/overlay.py, sparsevd/io.py): a user's nn.Module that is
not a tree of supported modules is saved with the specs of the modules sparsevd made, and loads
into the architecture its constructor builds, bit for bit; a wrong architecture, a wrong dtype,
a changed byte are errors naming the file."""
import pytest
import torch
import torch.nn.functional as F
from conftest import prune, same_state
from torch import nn

import sparsevd
from sparsevd.nn import LinearSVDO, SparseConv2d, SparseLinear, SplitMultiheadAttention


class UserNet(nn.Module):
    """Convolutions with batch norm, an attention, an MLP and a head tied to an embedding."""

    def __init__(self, hidden=16, mlp=40):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8, hidden)
        self.attn = nn.MultiheadAttention(hidden, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(hidden, mlp), nn.Linear(mlp, hidden)
        self.emb = nn.Embedding(10, hidden)
        self.head = nn.Linear(hidden, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: stays dense
        with torch.no_grad():
            self.bn.running_mean.normal_(0, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, img):
        h = F.relu(self.bn(self.conv(img)))  # (B, 8, H, W)
        t = self.proj(h.flatten(2).transpose(1, 2))  # (B, HW, hidden)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + self.fc2(F.gelu(self.fc1(t)))
        return self.head(t.mean(1))


def _trained(hidden=16):
    model = prune(sparsevd.convert(UserNet(hidden)).eval(), 0.6)
    with torch.no_grad():
        model.fc1.log_sigma2[:8] = 20.0  # dead MLP neurons: compacted
    return model


def test_a_deployed_user_model_loads_into_its_fresh_architecture(tmp_path):
    deployed = sparsevd.deploy(_trained(), cost_model="csr")
    assert isinstance(deployed.bn, nn.Identity) and isinstance(deployed.conv, SparseConv2d)
    assert deployed.fc1.out_features < 40 and deployed.head.weight is deployed.emb.weight
    path = sparsevd.save(deployed, tmp_path / "net.safetensors")
    with pytest.raises(ValueError, match=r"test_overlay\.UserNet, is not a tree.*model=\.\.\."):
        sparsevd.load(path)
    for skeleton in (UserNet(), sparsevd.convert(UserNet())):  # dense or converted: both work
        loaded = sparsevd.load(path, model=skeleton)
        assert loaded is skeleton and not loaded.training
        assert isinstance(loaded.attn, SplitMultiheadAttention) and isinstance(loaded.attn.q_proj, SparseLinear)
        assert isinstance(loaded.bn, nn.Identity) and loaded.fc1.out_features == deployed.fc1.out_features
        assert loaded.head.weight is loaded.emb.weight  # the user's tie, loaded once
        same_state(loaded, deployed, ordered=True)
        img = torch.randn(2, 3, 6, 6)
        with torch.no_grad():
            assert torch.equal(loaded(img), deployed(img))


def test_a_converted_user_model_loads_with_its_training_state(tmp_path):
    model = _trained()
    path = sparsevd.save(model, tmp_path / "c.safetensors")
    loaded = sparsevd.load(path, model=UserNet())
    assert isinstance(loaded.fc1, LinearSVDO) and isinstance(loaded.attn.v_proj, LinearSVDO)
    same_state(loaded, model, ordered=True)
    img = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(img), model(img))


def test_wrong_architecture_dtype_or_bytes_are_named_errors(tmp_path):
    path = sparsevd.save(sparsevd.deploy(_trained(), cost_model="masked"), tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match=r"n\.safetensors: module 'proj'.*Linear \[24, 8\].*Linear \[16, 8\]"):
        sparsevd.load(path, model=UserNet(hidden=24))
    other = UserNet()
    del other.fc2
    with pytest.raises(ValueError, match="has no submodule 'fc2'"):
        sparsevd.load(path, model=other)
    with pytest.raises(ValueError, match=r"tensor 'emb.weight' is torch.float32 in the file, torch.float64"):
        sparsevd.load(path, model=UserNet().double())
    extra = UserNet()
    extra.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"the model lacks|the file lacks \['extra.bias'"):
        sparsevd.load(path, model=extra)
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted file: the checksum"):
        sparsevd.load(path, model=UserNet())


@pytest.mark.parametrize("first, second", [("a", "b"), ("z", "a")])
def test_a_module_shared_under_two_names_stays_shared(tmp_path, first, second):
    """Also when the alias's name sorts before the module's first name (the file's JSON keys are
    sorted: the alias must still be put in after what it names)."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, first, nn.Linear(6, 6))
            setattr(self, second, getattr(self, first))
            self.out = nn.Linear(6, 2)

        @property
        def a_(self):
            return getattr(self, first)

        @property
        def b_(self):
            return getattr(self, second)

        def forward(self, x):
            return self.out(self.b_(torch.tanh(self.a_(x))))

    model = sparsevd.convert(Shared()).eval()
    assert model.a_ is model.b_
    deployed = sparsevd.deploy(model, cost_model="csr")
    assert deployed.a_ is deployed.b_
    loaded = sparsevd.load(sparsevd.save(deployed, tmp_path / "s.safetensors"), model=Shared())
    assert loaded.a_ is loaded.b_ and isinstance(loaded.a_, SparseLinear)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))
