"""Runs open_clip's trainer (``open_clip_train.main.main``) on a tiny model and records the loss of
every step, with open_clip's losses or, with ``--fastcon``, fastcon's after
``fastcon.integrations.open_clip.apply()``. Used by tests/test_open_clip_train.py, in one process or
under torchrun (each rank writes its own record)::

    python tests/open_clip_train_run.py OUT.json [--fastcon] -- TRAINER_ARGS...

Three things make the trainer's synthetic run a test of the loss (found while trying it):
* its synthetic dataset makes every sample the same black image and caption, so the CLIP loss is
  log(B) for any loss and every gradient 0: here each sample is its own random image and caption;
* the tiny model (``fastcon-tiny``) is registered through open_clip's own config mechanism;
* under torchrun on a CPU it hands ``device_ids=[device]`` to DistributedDataParallel, which newer
  torch refuses for a CPU model: the device ids are left out there.
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
WORDS = ["red", "green", "blue", "cat", "dog", "car", "tree", "house", "small", "large", "old", "new"]


def _distinct_samples():
    from PIL import Image

    from open_clip_train import data

    def getitem(self, idx):
        rng = np.random.default_rng(idx)
        image = Image.fromarray(rng.integers(0, 256, (*self.image_size, 3), dtype=np.uint8))
        caption = " ".join(WORDS[int(k)] for k in rng.integers(0, len(WORDS), 4))
        return self.transform(image), self.preprocess_txt(caption)

    data.SyntheticDataset.__getitem__ = getitem


def _ddp_without_cpu_device_ids():
    real = torch.nn.parallel.DistributedDataParallel

    class DDP(real):
        def __init__(self, module, device_ids=None, **kwargs):
            on_cpu = device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids)
            super().__init__(module, device_ids=None if on_cpu else device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = DDP


def _recording(record):
    """Wraps the trainer's create_loss: every call of the loss it builds adds its outputs to record."""
    import open_clip_train.main as main

    real = main.create_loss

    def create_loss(args):
        loss = real(args)
        forward = loss.forward

        def recorded(*a, **k):
            out = forward(*a, **k)
            values = out if isinstance(out, dict) else {"loss": out}
            record.append({key: float(v.detach()) for key, v in values.items()})
            return out
        loss.forward = recorded
        record.insert(0, {"class": f"{type(loss).__module__}.{type(loss).__name__}"})
        return loss

    main.create_loss = create_loss


def run(out_path, use_fastcon, trainer_args):
    import open_clip

    import open_clip_train.main as main

    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "fastcon-tiny.json")
        with open(cfg, "w") as f:
            json.dump(TINY, f)
        open_clip.add_model_config(cfg)
        _distinct_samples()
        _ddp_without_cpu_device_ids()
        if use_fastcon:
            import fastcon.integrations.open_clip as fastcon_open_clip

            fastcon_open_clip.apply()
        record = []
        _recording(record)
        main.main(list(trainer_args) + ["--logs", os.path.join(tmp, "logs")])
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sep = sys.argv.index("--")
    options = sys.argv[1:sep]
    run(options[0], "--fastcon" in options, sys.argv[sep + 1:])
