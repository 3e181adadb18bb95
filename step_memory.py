"""What a training step holds in memory: its tensors' bytes counted exactly as they are made and freed (TensorMemory),
on a CPU, where there is no allocator to ask.

    with TensorMemory() as mem:                   # every storage alive now (weights, inputs, optimiser state) is not
        loss = step()                             # the step's; an output of an op is counted once, on its first
        loss.backward()                           # appearance, if its storage is new, and uncounted when it dies
    mem.peak                                      # bytes: the analogue of torch.cuda.max_memory_allocated() - before

What is counted is what the ops return: a kernel's scratch space (cuDNN / cuBLAS workspaces on a GPU, oneDNN's on a
CPU) is not, nor what an allocator rounds up or keeps cached.
"""
import functools
import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_of(t):
    """A tensor's storage (one Python object per live storage, however many views share it), None if it has none
    (sparse and other non-strided layouts)."""
    # type(), not isinstance(): the garbage collector also hands over lazy module objects that warn when asked their class
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

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted = set()  # id() of the storages counted and still alive
        self.before = {}  # id() -> weak reference, of the storages alive when counting began

    def __enter__(self):
        gc.collect()  # what is unreachable now dies now, not in the middle of the count
        for t in gc.get_objects():
            s = storage_of(t)
            if s is not None:
                self.before[id(s)] = weakref.ref(s)  # weak: an id is only this storage's while the reference lives
        return super().__enter__()

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
        self.peak = max(self.peak, self.live)
        return out

    def _existed(self, s):
        ref = self.before.get(id(s))
        return ref is not None and ref() is s

    def _free(self, key, nbytes):
        self.counted.discard(key)
        self.live -= nbytes
