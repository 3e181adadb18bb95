"""Shared fixtures: the tiny offline Stable Diffusion, and a stock diffusers pipeline around the same weights."""
import contextlib
import io
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one thread each (two threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # per process on two cores runs up to 10x slower); subprocesses too
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from model import load_sd  # noqa: E402


@pytest.fixture
def tiny():
    return load_sd("tiny")  # a fresh copy per test (30 ms): tests inject LoRA into it


@pytest.fixture
def tiny_xl():
    return load_sd("tiny-xl")


def pipeline(sd):
    """diffusers' own StableDiffusionPipeline (or StableDiffusionXLPipeline) over our components: the reference."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if sd.text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(vae=sd.vae, text_encoder=sd.text_encoder, text_encoder_2=sd.text_encoder_2,
                                         tokenizer=sd.tokenizer, tokenizer_2=sd.tokenizer_2, unet=sd.unet,
                                         scheduler=sd.scheduler, add_watermarker=False,
                                         force_zeros_for_empty_prompt=sd.force_zeros_for_empty_prompt)
    else:
        pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                       scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_here(script, *args, check=True):
    """Run a script in this process, as `python script args` would, and return what subprocess.run would (returncode,
    stdout, stderr); check: the run must succeed. A subprocess spends seconds importing torch, diffusers and
    transformers, which this process has already done. For runs that need no process of their own (what a signal, a
    kill, torchrun or a peak-memory measurement tests runs in a subprocess); what a script sets for the whole process
    (signal handlers, torch's random state and thread count) is put back afterwards."""
    import signal
    import subprocess

    import torch
    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    sys.argv = [script, *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), torch.random.fork_rng(devices=[]):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
    if check:
        assert code == 0, err.getvalue()[-3000:]
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def refused(script, *args):
    """Run a script's checks of its input in this process (run_here): (exit status, stderr) of the first die();
    milliseconds a case. Only for input that a script refuses before it trains (one subprocess case per script shows
    the same line from a real process)."""
    proc = run_here(script, *args, check=False)
    if proc.returncode == 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} ran to the end instead of refusing its input")
    return proc.returncode, proc.stderr


def held_for_backward(run, exclude=()):
    """The bytes of the distinct storages that autograd saves for backward while run() runs (each counted once, views
    included), those of the tensors in `exclude` (e.g. a model's weights) not counted."""
    import torch
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())
