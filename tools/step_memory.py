"""What a training step holds in memory: its tensors' bytes counted exactly as they are made and freed (TensorMemory),
on a CPU, where there is no allocator to ask; and the same count with no weights and no GPU, on fake tensors
(FakeStep), under CUDA's autocast policy for a GPU's figure (CudaAutocast): python -m tools.bench --estimate.

    with TensorMemory() as mem:                   # every storage alive now (weights, inputs, optimiser state) is not
        loss = step()                             # the step's; an output of an op is counted once, on its first
        loss.backward()                           # appearance, if its storage is new, and uncounted when it dies
    mem.peak                                      # bytes: the analogue of torch.cuda.max_memory_allocated() - before

    fake = FakeStep()                             # the model built on the meta device (no memory), then
    fake.fake(model)                              # its weights fake: shapes, strides, dtypes, no numbers
    with fake, CudaAutocast(), TensorMemory() as mem:   # the step as above, under torch.autocast("cpu", bf16)
        ...

What is counted is what the ops return: a kernel's scratch space (cuDNN / cuBLAS workspaces on a GPU, oneDNN's on a
CPU) is not, nor what an allocator rounds up or keeps cached.
"""
import functools
import gc
import inspect
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map


def storage_of(t):
    """A tensor's storage (one Python object per live storage, however many views share it), None if it has none
    (sparse and other non-strided layouts)."""
    # type(), not isinstance(): the garbage collector also hands over lazy module objects that warn when asked their
    # class
    return t.untyped_storage() if issubclass(type(t), torch.Tensor) and t.layout == torch.strided else None


@functools.cache
def aliases(func):
    """Whether an op may return (a view of) an input's storage: its schema marks such a return with an alias
    annotation, Tensor(a); every other op returns new storages. Asked once per op, so that the count costs little."""
    return any(r.alias_info is not None for r in func._schema.returns)


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages created while active (`live` now, and their `peak`): on a CPU, the exact analogue
    of CUDA's allocator statistics (at a small model's scale, RSS is blurred by the C allocator's own bookkeeping).

    An op's output is new memory only if its storage is: not one of the op's inputs' (a view such as the transpose of
    a weight inside F.linear, an in-place op, an out= argument), not one that existed when counting began (weights,
    buffers, inputs, optimiser state, found through the garbage collector, which tracks every tensor), and not one
    counted already. Storages are told apart by their Python object, which lives exactly as long as the storage."""

    counting = []  # the instances active now, innermost last: what phase() labels

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.phase = self.peak_phase = None  # what the step was doing (phase()), and what it did at the peak
        self.peaks = {}  # phase -> the most bytes live during it
        self.counted = set()  # id() of the storages counted and still alive
        self.before = {}  # id() -> weak reference, of the storages alive when counting began

    def __enter__(self):
        gc.collect()  # what is unreachable now dies now, not in the middle of the count
        for t in gc.get_objects():
            s = storage_of(t)
            if s is not None:
                self.before[id(s)] = weakref.ref(s)  # weak: an id is only this storage's while the reference lives
        TensorMemory.counting.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        TensorMemory.counting.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = ()
        if aliases(func):  # a view, an in-place or out= op: its output may be an input's storage
            inputs = {id(s) for s in map(storage_of, tree_leaves((args, kwargs))) if s is not None}
        for t in tree_leaves(out):
            s = storage_of(t)
            if s is None or id(s) in self.counted or id(s) in inputs or self._existed(s):
                continue
            self.counted.add(id(s))
            self.live += s.nbytes()
            weakref.finalize(s, self._free, id(s), s.nbytes())  # fires when the storage dies
        if self.live > self.peaks.get(self.phase, -1):
            self.peaks[self.phase] = self.live
            if self.live > self.peak:
                self.peak, self.peak_phase = self.live, self.phase
        return out

    def _existed(self, s):
        ref = self.before.get(id(s))
        return ref is not None and ref() is s

    def _free(self, key, nbytes):
        self.counted.discard(key)
        self.live -= nbytes


def phase(name):
    """Label what the step does from here on ("chain forward", "decoder backward", ...) for the active TensorMemory,
    which keeps the label of its peak (peak_phase)."""
    for mem in TensorMemory.counting:
        mem.phase = name


class FakeStep(FakeTensorMode):
    """Fake tensors for a whole training step (PyTorch's FakeTensorMode): each op computes its output's shape, dtype
    and strides and nothing else, so that TensorMemory counts the step's bytes without its weights or its arithmetic.

    The sampler reads a few numbers as Python scalars: the scheduler's alphas or sigmas at a timestep, the K and the
    DRTune offsets drawn from a generator. So once `real_scalars` is set (for the step, after the model is faked), an
    op none of whose tensors is fake runs for real: those tables and draws, a timestep's embedding before it meets a
    weight; what meets a fake tensor becomes fake. Its bytes are counted either way, real or fake. Not so the ops that
    FakeTensorMode itself runs while it handles one (a decomposition's casts and output buffers: addmm in bf16 makes
    its fp32 copies with empty_strided, which has no tensor argument): those stay fake, or the real buffers they make
    would carry real arithmetic through the whole model, many times slower (docs/speed-and-memory.md)."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)  # real tensors meeting fake ones are faked on the way
        self.real_scalars = False
        self.handling = 0  # > 0 while FakeTensorMode handles an op: what it runs then is never real

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (self.real_scalars and not self.handling
                and not any(isinstance(t, FakeTensor) for t in tree_leaves((args, kwargs)))):
            return func(*args, **(kwargs or {}))
        self.handling += 1
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self.handling -= 1

    def fake(self, module, device="cpu"):
        """Replace a module's parameters and buffers (real, or on the meta device: built without memory) by fake ones
        on `device`, of the same shapes, strides, dtypes and requires_grad. Returns the module."""
        with self:
            for m in module.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, t in getattr(m, kind).items():
                        if t is None:
                            continue
                        f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                        getattr(m, kind)[name] = torch.nn.Parameter(f, t.requires_grad) if kind == "_parameters" else f
        return module


# CUDA's autocast policy where it differs from the CPU's, by the Python-level names of the ops, from PyTorch's
# aten/src/ATen/autocast_mode.{h,cpp}: the ops CUDA runs in float32 (its "fp32" list; the CPU's has none of these but
# the losses), those it runs with dtype=float32 (its "fp32_set_opt_dtype" list: the output in fp32, the input as it
# is), and the matrix products it runs in half precision where the CPU does not (its "lower_precision_fp" list
# minus the CPU's).
CUDA_FP32 = {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
             "sinh", "tan", "pow", "__pow__", "__rpow__", "__rtruediv__", "__rdiv__", "softplus", "layer_norm",
             "group_norm", "cosine_similarity", "cdist", "pdist", "dist", "renorm", "logsumexp"}
CUDA_FP32_OUTPUT = {"softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum"}
CUDA_HALF_ONLY = {"einsum", "mv", "addmv", "addr", "chain_matmul", "multi_dot"}
CUDA_POLICY = CUDA_FP32 | CUDA_FP32_OUTPUT | CUDA_HALF_ONLY


class CudaAutocast(TorchFunctionMode):
    """CUDA's autocast on CPU tensors: while the CPU's autocast is on, the ops that CUDA's autocast treats otherwise
    are cast as CUDA's would (CUDA_FP32, CUDA_FP32_OUTPUT, CUDA_HALF_ONLY), so that a step on the CPU (fake) holds the
    tensors of the dtypes a GPU's would: e.g. a GroupNorm on bf16 activations makes, and saves for backward, an fp32
    copy of its input and an fp32 output on CUDA, a bf16 output on the CPU. Tensors on CUDA itself need no such
    help; fake ones can not be on CUDA here, where PyTorch has no CUDA (its autograd asks the device for streams)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad):
            return self._run_backward(func, *args, **kwargs)
        name = getattr(func, "__name__", None)
        if name in CUDA_POLICY and torch.is_autocast_enabled("cpu"):
            if name in CUDA_FP32_OUTPUT:
                if kwargs.get("dtype") is None and _floats(args, kwargs) - {torch.float32}:
                    kwargs = dict(kwargs, dtype=torch.float32)
            else:
                dtype = torch.float32 if name in CUDA_FP32 else torch.get_autocast_dtype("cpu")
                args, kwargs = tree_map(lambda t: t.to(dtype) if _is_float(t) else t, (args, kwargs))
        return func(*args, **kwargs)

    def _run_backward(self, func, *args, **kwargs):
        """loss.backward(), torch.autograd.backward or .grad, run with this mode on. A mode's handler runs with the
        mode off, and so would everything that backward runs: the recomputations of checkpointed stages
        (sampler.checkpoint, sampler.halves_in_turn), which run forward ops under autocast as the first forward did:
        without this, the estimate missed the fp32 GroupNorm copies of the VAE decoder's recomputed stages that a GPU
        measured (docs/speed-and-memory.md, "Checked on a GPU"). So the autograd engine is called here, as those
        functions' bodies call it past their override check."""
        kw = inspect.signature(func).bind(*args, **kwargs)
        kw.apply_defaults()
        kw = kw.arguments
        if kw.get("is_grads_batched") or kw.get("materialize_grads"):
            raise NotImplementedError("CudaAutocast: is_grads_batched, materialize_grads")
        outputs = kw.get("self", kw.get("tensors", kw.get("outputs")))
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        grads = kw.get("gradient", kw.get("grad_tensors", kw.get("grad_outputs")))
        grads = [None] * len(outputs) if grads is None else [grads] if isinstance(grads, torch.Tensor) else grads
        grads = tuple(torch.ones_like(out) if g is None and out.numel() == 1 else g for out, g in zip(outputs, grads))
        if any(g is None for g in grads):
            raise RuntimeError("grad can be implicitly created only for scalar outputs")
        inputs = kw.get("inputs") or ()
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        retain_graph = kw["create_graph"] if kw["retain_graph"] is None else kw["retain_graph"]
        is_grad = func is torch.autograd.grad
        with self:
            result = torch.autograd.graph._engine_run_backward(
                outputs, grads, retain_graph, kw["create_graph"], inputs,
                bool(kw["allow_unused"]) if is_grad else True, accumulate_grad=not is_grad)
        return result if is_grad else None


def _is_float(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _floats(args, kwargs):
    return {t.dtype for t in tree_leaves((args, kwargs)) if _is_float(t)}
