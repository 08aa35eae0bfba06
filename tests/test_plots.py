"""Pictures of a run (sparsevd.plots): `sparsevd train --out DIR` writes curves.png and masks.png,
`sparsevd plot DIR` redraws them; both are real, non-trivial images."""
import numpy as np
import pytest
import torch
from test_cli import _train_args, data_dir  # noqa: F401  (the data fixture)

from sparsevd import cli
from sparsevd.plots import kept_masks, plot_masks


def _image(path):
    import matplotlib.image

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 600
    return img


def _non_trivial(img):
    grey = img[..., :3].mean(-1)
    assert grey.std() > 0.05, "an almost uniform picture"
    assert len(np.unique((grey * 32).astype(int))) >= 4, "too few grey levels to show anything"


def test_train_writes_and_plot_redraws(tmp_path, data_dir, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert cli.main(_train_args(data_dir, out, "--epochs", "2", "--pretrain-epochs", "1",
                                "--threads", "1")) == 0
    curves, masks = out / "curves.png", out / "masks.png"
    for p in (curves, masks):
        _non_trivial(_image(p))
    first = {p: p.read_bytes() for p in (curves, masks)}
    for p in first:
        p.unlink()
    capsys.readouterr()
    assert cli.main(["plot", str(out)]) == 0
    assert "curves.png" in capsys.readouterr().out
    for p in first:
        _non_trivial(_image(p))
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 1
    assert "summary.json: not found" in capsys.readouterr().err


def test_masks_show_the_kept_pixels(tmp_path):
    """The pixel panel is white exactly where some kept weight of the first layer reads."""
    import sparsevd

    model = sparsevd.models.LeNet300(svd=True)
    with torch.no_grad():
        model[1].log_sigma2.fill_(20.0)  # everything dropped ...
        model[1].log_sigma2[:, :28 * 14] = -20.0  # ... but the top half of the image
    masks = kept_masks(model)
    assert masks["1"].shape == (300, 784) and int(masks["1"].sum()) == 300 * 28 * 14
    path = plot_masks(model, tmp_path / "m.png", (1, 28, 28))
    _non_trivial(_image(path))
    with pytest.raises(ValueError, match="no weight layers"):
        plot_masks(torch.nn.Sequential(torch.nn.ReLU()), tmp_path / "x.png")
