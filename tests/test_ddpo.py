"""ddpo.py, the reinforcement-learning baseline: its advantages and PPO loss, and the script end to end on the tiny
model (the PPO ratio starts at 1, the real-JPEG reward rises, a killed run resumes to the same numbers, bad input is
one line)."""
import ast
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, refused, run_here

FAST = ["--model", "tiny", "--ddim-steps", "4", "--eval-n", "2", "--batch-size", "2"]


def script_functions(*names):
    """The named top-level functions and classes of ddpo.py, without running the script around them."""
    with open(os.path.join(ROOT, "ddpo.py")) as f:
        tree = ast.parse(f.read())
    defs = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names]
    namespace = {"torch": torch}
    exec(compile(ast.Module(defs, type_ignores=[]), "ddpo.py", "exec"), namespace)
    return [namespace[n] for n in names]


group_advantages, RunningPromptStats, ppo_loss = script_functions("group_advantages", "RunningPromptStats",
                                                                  "ppo_loss")


def test_group_advantages_have_mean_zero_and_unit_std_per_prompt():
    g = torch.Generator().manual_seed(0)
    prompts = ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b", "c"]
    rewards = torch.randn(12, generator=g) + torch.tensor([0.0, 5.0, -3.0] * 4)  # very different levels per prompt
    adv = group_advantages(rewards, prompts)
    for prompt in "abc":
        a = adv[[i for i, q in enumerate(prompts) if q == prompt]]
        assert abs(a.mean().item()) < 1e-6 and a.std(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    assert group_advantages(torch.ones(4), ["a"] * 4).tolist() == [0.0] * 4  # equal rewards: no signal, no NaN


def test_running_stats_use_the_round_until_a_prompt_has_a_full_buffer():
    stats = RunningPromptStats(buffer=4)
    r1 = torch.tensor([1.0, 2.0, 10.0, 20.0])
    adv = stats.advantages(r1, ["a", "a", "b", "b"])  # 2 of 4 seen per prompt: the round's mean and std
    torch.testing.assert_close(adv, (r1 - r1.mean()) / (r1.std(unbiased=False) + 1e-6))
    r2 = torch.tensor([3.0, 4.0, 30.0, 40.0])
    adv = stats.advantages(r2, ["a", "a", "b", "b"])  # 4 seen: each prompt's own last four
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])
    want = torch.cat([(r2[:2] - a.mean()) / (a.std(unbiased=False) + 1e-6),
                      (r2[2:] - b.mean()) / (b.std(unbiased=False) + 1e-6)])
    torch.testing.assert_close(adv, want)
    stats.advantages(torch.tensor([5.0, 6.0]), ["a", "a"])
    assert stats.seen["a"] == [3.0, 4.0, 5.0, 6.0]  # the buffer keeps the latest


def test_ppo_loss_clips_the_ratio_in_the_direction_of_the_advantage():
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2)
    loss, ratio = ppo_loss(old.clone(), old, adv, 0.1)  # same policy: ratio 1, loss = -mean(A)
    assert ratio.tolist() == [1.0, 1.0] and loss.item() == 0.0
    logp = torch.log(torch.tensor([1.5, 1.5])).requires_grad_()  # ratio 1.5 for both
    loss, _ = ppo_loss(logp, old, adv, 0.1)
    # A > 0: the gain is capped at 1.1 (clipped, no gradient); A < 0: the penalty is the full 1.5 (gradient kept)
    assert loss.item() == pytest.approx((-1.1 + 1.5) / 2)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 1.5 / 2])


def test_the_rl_gradient_measured_in_the_readme_is_ddpo_s_update(tiny):
    """rl_vs_backprop.gradient_estimates' score-function estimate (docs/rl-vs-backprop.md's 'RL' column) is the
    gradient ddpo.py follows: minus the PPO surrogate's gradient at ratio 1, summed over the steps, times the latent's
    size (DDPO averages the log-density over it), on the same trajectories and advantages r - mean r."""
    from studies import rl_vs_backprop
    from lora import inject_lora
    from model import decode, encode_prompts, latent_shape
    from rewards import load_reward
    from sampler import step_logprob, ddim_rollout, ddim_transition, guidance_context, guided_output
    params = inject_lora(tiny.unet, rank=4)
    with torch.no_grad():  # away from up = 0, so that every LoRA weight has a gradient
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    reward_fn = load_reward("compress", "cpu", torch.float32)
    n, seed, steps = 4, 1, 2
    score, path = rl_vs_backprop.gradient_estimates(tiny, params, reward_fn, "a cat", n, seed, 32, steps, 1.0)
    # the same n trajectories (one chunk), scored, then DDPO's loss step by step
    x_T = torch.randn(n, *latent_shape(tiny, 32), generator=torch.Generator().manual_seed(seed))
    cond, uncond = encode_prompts(tiny, ["a cat"] * n), encode_prompts(tiny, [""] * n)
    xs, logps_old, ts = ddim_rollout(tiny, cond, uncond, x_T, steps, 1.0, 1.0,
                                     torch.Generator().manual_seed(hash((seed, 0)) % 2**63))
    with torch.no_grad():
        r = reward_fn(decode(tiny, xs[-1]), ["a cat"] * n)
    context = guidance_context(cond, uncond, 1.0, torch.float32)
    ddpo = [torch.zeros_like(p) for p in params]
    for j, t in enumerate(ts):
        mean, sigma = ddim_transition(tiny, guided_output(tiny, xs[j], t, context, 1.0), xs[j], t, steps, 1.0)
        loss, ratio = ppo_loss(step_logprob(xs[j + 1], mean, sigma), logps_old[j], r - r.mean(), 0.2)
        assert (ratio - 1).abs().max() < 1e-5
        for acc, g in zip(ddpo, torch.autograd.grad(loss, params)):
            acc += g
    want = -x_T[0].numel() * torch.cat([g.flatten() for g in ddpo])
    torch.testing.assert_close(score, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert path.norm() > 0 and torch.nn.functional.cosine_similarity(score, path, 0) < 0.99  # two estimates


def run(*args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "ddpo.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out):
    from runs import read_metrics
    return read_metrics(out)


def test_ratio_is_one_on_the_first_inner_epoch_and_the_update_ascends(tmp_path):
    """One optimisation step per epoch: the first epoch's log-densities are recomputed under the weights that
    sampled, so every ratio is 1 to rounding and the surrogate is -mean(A) = 0 (advantages normalised over the
    round); after one small AdamW step along its gradient the second epoch's ratios have moved and the surrogate
    -mean(A * ratio) has gone down (clip range 1: no clipping, so this is first order in the step)."""
    run_here("ddpo.py", "--reward", "jpeg", "--out", tmp_path / "r", "--steps", 1, "--samples-per-step", 4,
             "--grad-accum", 2, "--inner-epochs", 2, "--lr", 1e-3, "--clip-range", 1.0, *FAST)
    (m,) = metrics(tmp_path / "r")
    first, second = m["ratio_max_dev"]
    assert first < 1e-5 and second > 100 * max(first, 1e-7), m["ratio_max_dev"]
    before, after = m["loss_per_epoch"]
    assert abs(before) < 1e-5 and after < before - 10 * abs(before), m["loss_per_epoch"]
    assert m["images_seen"] == 4 and {"reward_mean", "seconds", "step"} <= set(m)
    assert {"config.json", "metrics.jsonl", "lora.safetensors", "checkpoint.pt", "reward.png"} <= set(
        os.listdir(tmp_path / "r"))
    assert m["step"] == 1  # rounds done, as the grids are named (step_000001.png); step 0 is the eval before training
    assert sorted(os.listdir(tmp_path / "r" / "samples")) == ["step_000000.png", "step_000001.png"]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["script"] == "ddpo.py"


def kill_after(lines, out, *args):
    """Start ddpo.py, SIGKILL it once metrics.jsonl has `lines` lines."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ddpo.py"), "--out", str(out), *map(str, args)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= lines:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    return proc.returncode


def test_resume_after_a_kill_continues_exactly(tmp_path):
    # running advantages with a buffer of 2: from the second round on, each prompt's own statistics, saved and restored
    args = ["--reward", "jpeg", "--steps", 4, "--samples-per-step", 4, "--grad-accum", 1, "--group-size", 2,
            "--stat-buffer", 2, "--save-every", 1, "--eval-every", 0, "--lr", 1e-2, "--clip-range", 1e-2, *FAST]
    run_here("ddpo.py", "--out", tmp_path / "whole", *args)
    assert kill_after(3, tmp_path / "cut", *args) == -signal.SIGKILL
    run_here("ddpo.py", "--resume", tmp_path / "cut")
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [x["step"] for x in cut] == [1, 2, 3, 4]
    for key in ("reward_mean", "loss", "grad_norm"):
        assert [x[key] for x in cut] == pytest.approx([x[key] for x in whole], rel=1e-5, abs=1e-7), key
    assert cut[-1]["eval_reward"] == pytest.approx(whole[-1]["eval_reward"], rel=1e-5)


def test_two_processes_share_each_round_and_stay_in_sync(tmp_path):
    """torchrun: each process samples and trains on its half of every round; the gradients are averaged, so the
    weights stay identical (save_checkpoint compares them at every checkpoint and stops the run if they differ)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--out", tmp_path / "two", "--reward", "jpeg", "--steps", 2, "--samples-per-step", 4, "--grad-accum", 1,
            "--batch-size", 1, "--eval-every", 0, *FAST[:-2]]
    proc = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "ddpo.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA weights identical on all 2 processes" in proc.stdout
    assert [x["images_seen"] for x in metrics(tmp_path / "two")] == [4, 8]


@pytest.mark.parametrize("args, message", [
    (["--reward", "nope"], "unknown reward"),
    (["--eta", "0"], "must be > 0"),
    (["--lr", "nan"], "finite"),
    (["--clip-range", "inf"], "finite"),
    (["--timestep-fraction", "1.5"], "(0, 1]"),
    (["--samples-per-step", "6", "--grad-accum", "4"], "multiple of"),
    (["--advantage", "group"], "--group-size >= 2"),
    (["--steps", "0"], ">= 1"),
    (["--lora-targets", "conv9"], "is named 'conv9'"),
    (["--resume", "{tmp}"], "no checkpoint.pt"),
    (["--samples-per-step", "1000000000", "--batch-size", "1", "--grad-accum", "1"],
     "--samples-per-step 1000000000 does not fit in memory"),  # after loading the model, before any work
    (["--out", "/sys/alignprop-test"], "cannot write in /sys"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    """(Prompt files, an existing run and the model are checked by runs.py, as for train.py: tested there.)"""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    status, stderr = refused("ddpo.py", *FAST, "--out", tmp_path / "out", *args)
    assert status == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()  # a refused command writes nothing


def test_resume_of_a_train_py_run_says_so(tmp_path):
    """Its flags would be refused one by one (train.py's --eta 0: "--eta must be > 0")."""
    (tmp_path / "config.json").write_text(json.dumps(dict(script="train.py", eta=0.0)))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    status, stderr = refused("ddpo.py", "--resume", tmp_path)
    assert status == 2 and stderr == (f"error: {tmp_path} is a train.py run (reward backprop), not a ddpo.py run; "
                                      f"continue it with python train.py --resume {tmp_path}\n")


def test_bad_input_from_a_real_process(tmp_path):
    proc = run(*FAST, "--out", tmp_path / "out", "--clip-range", "inf", check=False)
    assert proc.returncode == 2 and proc.stderr == "error: --clip-range must be a finite number > 0, got inf\n"


def test_help_shows_the_defaults():
    text = " ".join(run_here("ddpo.py", "-h").stdout.split())  # argparse wraps the lines
    assert "rounds in total (default 20)" in text and "AdamW learning rate (default 0.0003)" in text
    assert "the reward queries (default 32; DDPO: 256 per epoch over 8 GPUs)" in text


def test_an_fp8_base_runs_under_ddpo_too(tmp_path):
    """--base-dtype fp8 is a shared flag (runs.Run quantizes the denoiser before it goes to the device): a round of
    RL on the fp8 base trains the LoRA and says what it saved."""
    proc = run_here("ddpo.py", "--reward", "jpeg", "--out", tmp_path / "r", "--steps", 1, "--samples-per-step", 4,
                    "--grad-accum", 2, "--base-dtype", "fp8", *FAST)
    assert "--base-dtype fp8:" in proc.stdout and "GB of frozen weights saved" in proc.stdout
    assert metrics(tmp_path / "r")[0]["grad_norm"] > 0
