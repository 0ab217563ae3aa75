"""One way to define an engine operator: ``EngineOp`` registers ``fastcon::<name>`` with
``torch.library`` (a custom op with its fake kernel, or a ``triton_op``, and its autograd) and is the
callable that runs it.

Eager calls on plain CPU/CUDA tensors run the operator's body through an ``autograd.Function`` built
from the same setup and backward, not through the dispatcher: a registered Python custom op's
dispatch imports ``torch._dynamo`` and ``torch._inductor`` on its first call (about 900 modules,
160 MiB of resident memory and over a second), which users who never compile should not pay. Under
``torch.compile``, and for tensor subclasses (FakeTensor, DTensor, functorch's wrappers), the
registered operator runs, so that compile sees one op with its fake kernel (or, for a ``triton_op``,
traces into its kernels) and ``opcheck`` checks what compile uses. Both paths compute the same
numbers (tests/test_direct_calls.py). The Triton operators register on first use: registering a
``triton_op`` imports Inductor itself.

An operator's autograd follows torch.library's convention: ``setup_context(ctx, inputs, output)``
saves what the backward needs, ``backward(ctx, *grads)`` returns one gradient per input (a list
output's gradients come as one list).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor

from fastcon._log import log_call

HAS_TRITON_OP = hasattr(torch.library, "triton_op")
_PLAIN = (Tensor, torch.nn.Parameter)
OPS: dict = {}  # name -> EngineOp, every engine operator defined


def _tensors(args):
    for v in args:
        if isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, Tensor))
        elif isinstance(v, Tensor):
            yield v


def eager_call(args) -> bool:
    """Whether a call with ``args`` may run the body without the dispatcher: not under
    ``torch.compile``, and every tensor argument a plain tensor on the CPU or a GPU."""
    if torch.compiler.is_compiling():
        return False
    for t in _tensors(args):
        if type(t) not in _PLAIN or t.device.type not in ("cpu", "cuda"):
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return True


def _annotations_evaluated(fn: Callable) -> Callable:
    """``fn`` with its annotations as objects: the operator bodies' modules say ``from __future__ import
    annotations``, and torch before 2.5 infers an operator's schema from the annotations without
    evaluating strings."""
    import typing

    fn.__annotations__ = typing.get_type_hints(fn)
    return fn


def _direct_launches():
    from fastcon.kernels.triton import direct_launches

    return direct_launches()


class EngineOp:
    """``fastcon::<name>`` computed by ``body(*args)``; ``fake`` gives its outputs' shapes and dtypes
    (``triton=True``: a ``triton_op``, whose fake kernel torch derives by tracing the body, where
    torch has ``triton_op``). ``setup_context`` and ``backward`` make it differentiable; without
    them it is a plain operator (a backward's second pass, say)."""

    def __init__(self, name: str, body: Callable, fake: Callable, *, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None, triton: bool = False, on_register: Optional[Callable] = None):
        self.name = f"fastcon::{name}"
        self.body, self.fake = body, fake
        self.setup_context, self.backward = setup_context, backward
        self.triton = triton
        self._on_register = on_register
        self._op = None
        self._function = None if backward is None else self._autograd_function()
        OPS[self.name] = self
        if not triton:
            self.registered()

    def registered(self):
        """The ``torch.library`` operator (registered on first use for a Triton operator)."""
        if self._op is None:
            body = _annotations_evaluated(self.body)
            if self.triton and HAS_TRITON_OP:
                op = torch.library.triton_op(self.name, body, mutates_args=())
            else:
                op = torch.library.custom_op(self.name, body, mutates_args=())
                op.register_fake(self.fake)
            if self.backward is not None:
                op.register_autograd(self.backward, setup_context=self.setup_context)
            self._op = op
            if self._on_register is not None:
                self._on_register(self)
        return self._op

    def _autograd_function(self):
        op = self

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                # outputs that get no gradient (the saved gradients an op returns, say) get None in the
                # backward, not zeros of their shape: 2·N·D wide floats for CLIP's
                ctx.set_materialize_grads(False)
                out = op.body(*args)
                op.setup_context(ctx, args, out)
                ctx.list_output = isinstance(out, list)
                ctx.n_args = len(args)
                return tuple(out) if ctx.list_output else out

            @staticmethod
            def backward(ctx, *grads):
                if all(g is None for g in grads):  # nothing reached the outputs (undefined is zero)
                    return (None,) * ctx.n_args
                out = op.backward(ctx, list(grads)) if ctx.list_output else op.backward(ctx, *grads)
                # a list input (the registered op's gradients name its items) is one input here
                return tuple(None if isinstance(g, list) else g for g in out)

        Eager.__name__ = Eager.__qualname__ = self.name.replace("fastcon::", "") + "_eager"
        return Eager

    def __call__(self, *args):
        if not eager_call(args):
            log_call(self.name, "the registered operator (torch.compile or a tensor subclass)", args)
            return self.registered()(*args)
        context = _direct_launches() if self.triton else contextlib.nullcontext()
        with context:
            if self._function is not None and torch.is_grad_enabled() and any(
                    t.requires_grad for t in _tensors(args)):
                log_call(self.name, "eager, through its autograd function", args)
                return self._function.apply(*args)
            log_call(self.name, "eager, no gradient", args)
            return self.body(*args)
