"""`spec-harness subset-model` (harness.targets.subset): the target without some decoder layers, written
as a transformers folder, is the draft `selfspec` / `layerskip` run in-process, loadable as --draft-model."""

import subprocess
import sys

import pytest
import torch

from harness.drafters.selfspec import skip_view
from harness.errors import UserError
from harness.targets import load_target
from harness.targets.subset import parse_layers, write_subset

IDS = torch.tensor([[5, 9, 13, 17, 5, 9, 13, 40, 41, 42, 5, 9]])


@pytest.mark.parametrize("skip", [(1,), (2, 3), (0, 3)])
def test_subset_folder_equals_the_skip_view(tiny_dir, tmp_path, skip):
    out = write_subset(tiny_dir, skip, tmp_path / "draft")
    draft = load_target(str(out), backend="native", device="cpu", dtype="float32", max_len=64)
    target = load_target(str(tiny_dir), backend="native", device="cpu", dtype="float32", max_len=64)
    assert draft.num_layers == 4 - len(skip)
    view = skip_view(target, skip).model
    draft.reset(1)
    view.reset(1)
    torch.testing.assert_close(draft.prefill(IDS).logits, view.prefill(IDS).logits)
    # and it decodes on from its cache like the view (the kept layers' caches line up)
    nxt = torch.tensor([[7]])
    torch.testing.assert_close(draft.forward(nxt).logits, view.forward(nxt).logits)
    assert not torch.allclose(draft.prefill(IDS).logits, target.prefill(IDS).logits, atol=1e-3)


def test_parse_layers_and_bad_sets(tiny_dir, tmp_path):
    assert parse_layers("3,8-10") == (3, 8, 9, 10)
    assert parse_layers("10-12,11") == (10, 11, 12)
    for bad in ("a", "5-3", "1-"):
        with pytest.raises(UserError, match="--skip-layers"):
            parse_layers(bad)
    for bad in ((), (4,), (-1,), (0, 1, 2, 3)):
        with pytest.raises(UserError, match="--skip-layers"):
            write_subset(tiny_dir, bad, tmp_path / "x")


def test_cli_bad_skip_is_one_line(tiny_dir, tmp_path):
    res = subprocess.run([sys.executable, "-m", "harness", "subset-model", "--target", str(tiny_dir),
                          "--skip-layers", "2-9", "--out", str(tmp_path / "d")], capture_output=True, text=True)
    assert res.returncode == 2 and "--skip-layers must name" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
