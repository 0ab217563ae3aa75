"""fastcon.integrations.open_clip: after ``apply()`` open_clip's trainer builds fastcon's losses and
trains as with open_clip's own.

* ``open_clip.create_loss`` (imported before ``apply()``) builds fastcon's ClipLoss, SigLipLoss,
  DistillClipLoss and CoCaLoss with open_clip's arguments; ``revert()`` restores open_clip's;
* ``open_clip_train.main.main`` on its synthetic dataset (made distinct per sample) with a tiny model
  registered through open_clip's config mechanism, a few steps on the CPU, with and without
  ``apply()``: the same loss at every step (within fp32 error) for CLIP and ``--siglip`` in one
  process, and on 2 gloo ranks under torchrun for ``--local-loss --gather-with-grad`` and for
  ``--siglip``
  (tests/open_clip_train_run.py runs the trainer and records the losses).

open_clip imports torchvision, which does not import beside the main test environment's torch:
``make test-peers`` runs this file in ``.venv-peers`` with FASTCON_REQUIRE_PEERS=1 (a missing
open_clip_train is then an error, not a skip).
"""
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest

if os.environ.get("FASTCON_REQUIRE_PEERS") == "1":
    import open_clip
    import open_clip_train.main  # noqa: F401
else:
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("open_clip_train.main")

import fastcon
import fastcon.integrations.open_clip as fastcon_open_clip
from helpers import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = ["--dataset-type", "synthetic", "--batch-size", "8", "--epochs", "1",
         "--model", "fastcon-tiny", "--workers", "0", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32",
         "--device", "cpu", "--seed", "0", "--save-frequency", "0", "--log-every-n-steps", "1"]


def _args(**kw):
    base = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False, gather_with_grad=False, rank=0,
                world_size=1, horovod=False, loss_dist_impl=None, coca_caption_loss_weight=2.0,
                coca_contrastive_loss_weight=1.0)
    return Namespace(**dict(base, **kw))


def test_apply_reaches_create_loss_imported_before_it_and_revert_restores():
    from open_clip import create_loss  # imported before apply(), as open_clip_train.main does

    import open_clip.factory as factory

    originals = {name: getattr(factory, name) for name in fastcon_open_clip.LOSSES}
    exported = [name for name in fastcon_open_clip.LOSSES if hasattr(open_clip, name)]  # (not SigLipLoss)
    cases = {"ClipLoss": _args(local_loss=True, gather_with_grad=True), "SigLipLoss": _args(siglip=True),
             "DistillClipLoss": _args(distill=True), "CoCaLoss": _args(model="coca_ViT-B-32")}
    try:
        fastcon_open_clip.apply()
        fastcon_open_clip.apply()  # twice: no change
        assert fastcon_open_clip.applied()
        for name, args in cases.items():
            loss = create_loss(args)
            assert type(loss) is getattr(fastcon, name), (name, type(loss))
        assert all(getattr(open_clip, name) is getattr(fastcon, name) for name in exported)
        clip = create_loss(cases["ClipLoss"])
        assert clip.local_loss and clip.gather_with_grad
        coca = create_loss(cases["CoCaLoss"])
        assert coca.caption_loss_weight == 2.0 and coca.clip_loss_weight == 1.0
        with pytest.raises(ValueError, match="horovod"):
            create_loss(_args(horovod=True))
    finally:
        fastcon_open_clip.revert()
    assert not fastcon_open_clip.applied()
    for name, args in cases.items():
        assert type(create_loss(args)) is originals[name]
    assert all(getattr(open_clip, name) is originals[name] for name in exported)


def _launch(out, use_fastcon, args, world):
    cmd = [os.path.join(HERE, "open_clip_train_run.py"), out] + (["--fastcon"] if use_fastcon else []) + ["--"] + args
    if world > 1:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, f"--nproc_per_node={world}", f"--master_port={free_port()}"] + cmd
    else:
        cmd = [sys.executable] + cmd
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(out))


CASES = {"clip": ([], 1), "siglip": (["--siglip"], 1),
         "clip-2-ranks-local-gather": (["--local-loss", "--gather-with-grad"], 2), "siglip-2-ranks": (["--siglip"], 2)}


@pytest.mark.parametrize("case", CASES)
def test_trainer_losses_equal_open_clip(case, tmp_path):
    extra, world = CASES[case]
    args = TRAIN + extra + ["--name", case, "--train-num-samples", str(24 * world)]  # 3 steps on each rank
    runs = {}
    procs = {which: _launch(str(tmp_path / f"{which}.json"), which == "fastcon", args, world)
             for which in ("open_clip", "fastcon")}  # both at once
    for which, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-4000:]
        runs[which] = [json.load(open(tmp_path / f"{which}.json.{rank}")) for rank in range(world)]
    for rank in range(world):
        theirs, ours = runs["open_clip"][rank], runs["fastcon"][rank]
        assert theirs[0]["class"].startswith("open_clip.") and ours[0]["class"].startswith("fastcon."), (theirs[0],
                                                                                                        ours[0])
        assert len(ours) == len(theirs) == 4, (ours, theirs)  # the class, then 3 steps
        for step, (a, b) in enumerate(zip(ours[1:], theirs[1:])):
            assert a.keys() == b.keys(), (a, b)
            for key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]) + 1e-6, (rank, step, key, a[key], b[key])
