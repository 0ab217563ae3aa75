"""open_clip's trainer on fastcon's losses, one line::

    import fastcon.integrations.open_clip as fastcon_open_clip
    fastcon_open_clip.apply()        # before open_clip_train.main.main(...) or open_clip.create_loss(args)

After ``apply()``, ``open_clip.create_loss(args)`` (and so ``python -m open_clip_train.main``, which
calls it) builds fastcon's ``ClipLoss``, ``SigLipLoss``, ``DistillClipLoss`` and ``CoCaLoss`` with the
arguments it gives open_clip's (``local_loss``, ``gather_with_grad``, ``rank``, ``world_size``,
``dist_impl``, the CoCa weights): the same losses and gradients in every distributed mode, without
the N×N logits. ``create_loss`` reads the classes from its module when it runs, so a ``create_loss``
imported before ``apply()`` (as ``open_clip_train.main`` does) is reached too; ``open_clip.ClipLoss``
and the others name fastcon's classes as well. ``revert()`` puts open_clip's back. Horovod
(``--horovod``) is a ValueError from fastcon's losses: run under torch.distributed.

To use it with ``python -m open_clip_train.main`` unchanged, a launcher of two lines suffices::

    import fastcon.integrations.open_clip, open_clip_train.main, sys
    fastcon.integrations.open_clip.apply(); open_clip_train.main.main(sys.argv[1:])

open_clip is an optional dependency: this module imports without it, and ``apply()`` says what to
install.
"""
from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["apply", "revert", "applied"]

LOSSES = ("ClipLoss", "SigLipLoss", "DistillClipLoss", "CoCaLoss")
_saved: Dict[Tuple[str, str], object] = {}  # (module name, class name) -> open_clip's class


def _modules():
    try:
        import open_clip
        import open_clip.factory as factory
    except ImportError as err:
        raise ImportError(f"fastcon.integrations.open_clip needs open_clip (pip install open-clip-torch): {err}") from err
    return {"open_clip.factory": factory, "open_clip": open_clip}


def apply() -> None:
    """Makes ``open_clip.create_loss`` (and the ``open_clip`` names) build fastcon's losses. Calling it
    again changes nothing."""
    import fastcon

    for mod_name, module in _modules().items():
        for name in LOSSES:
            current = getattr(module, name, None)
            if current is None:
                continue
            _saved.setdefault((mod_name, name), current)
            setattr(module, name, getattr(fastcon, name))


def revert() -> None:
    """Puts open_clip's own loss classes back (nothing happens if ``apply()`` was not called)."""
    if not _saved:
        return
    modules = _modules()
    for (mod_name, name), original in list(_saved.items()):
        setattr(modules[mod_name], name, original)
    _saved.clear()


def applied() -> bool:
    """Whether ``apply()`` is in effect."""
    return bool(_saved)
