"""fastcon.functional's public surface: ``__all__`` names every public function of its family modules,
and every name in it is reachable as ``fastcon.functional.<name>``."""
import importlib
import pkgutil

import fastcon
import fastcon.functional as FC


def _family_modules():
    """The loss-family modules of the package (``_checks`` and other private modules excluded)."""
    mods = [importlib.import_module(f"fastcon.functional.{info.name}") for info in pkgutil.iter_modules(FC.__path__)
            if not info.name.startswith("_")]
    assert mods, "fastcon.functional has no family modules"
    return mods


def test_all_lists_every_public_function():
    defined = {name: mod.__name__ for mod in _family_modules() for name, obj in vars(mod).items()
               if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == mod.__name__}
    missing = sorted(f"{mod}.{name}" for name, mod in defined.items() if name not in FC.__all__)
    assert not missing, f"public functions missing from fastcon.functional.__all__: {missing}"


def test_all_names_are_reachable():
    assert len(FC.__all__) == len(set(FC.__all__))
    for name in FC.__all__:
        assert hasattr(fastcon.functional, name), name
    namespace = {}
    exec("from fastcon.functional import *", namespace)
    assert set(FC.__all__) <= set(namespace)


def test_exports_are_the_family_functions():
    for mod in _family_modules():
        for name in FC.__all__:
            if name in vars(mod) and getattr(vars(mod)[name], "__module__", None) == mod.__name__:
                assert getattr(FC, name) is vars(mod)[name], name


def test_documented_functions_stay_exported():
    documented = {"clip_loss", "siglip_loss", "negatives_clip_loss", "ntxent_loss", "multiple_negatives_ranking_loss",
                  "distill_loss", "distill_clip_losses", "align_uniform_loss", "slerp", "m2mix_loss", "mochi_loss",
                  "pooled_alignment_loss", "patch_nce_loss", "filip_similarities", "filip_loss", "maxsim_scores",
                  "maxsim_loss", "topk_similarity", "retrieval_recall"}
    assert documented <= set(FC.__all__), sorted(documented - set(FC.__all__))
    assert all(callable(getattr(FC, name)) for name in documented)
