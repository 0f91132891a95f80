"""`advgkl eval` never loses a result and says what it does (issue 17).

Every refusal is one line naming the folder or file, exit code 2, and leaves every file as it was
(same bytes, same modification times, nothing new). A finished eval is re-reported with --resume
without attacking again; an interrupted one continues from its AutoAttack state.
"""
import hashlib
import json
import shutil
from importlib.metadata import version

import pytest
import torch

from advgkl import attacks, cli, evaluate, honesty, trainers
from advgkl.checkpoint import RunLock, load_checkpoint
from advgkl.config import from_saved
from advgkl.errors import UserError
from advgkl.runtime import build_model
from conftest import tiny_recipe  # tests/ is on sys.path

# APGD-CE on the first 8 test points in one chunk, no gradient-masking checks, no W&B: about a second
EVAL = ["--wandb", "disabled", "--device", "cpu", "--version", "custom", "--attacks", "apgd-ce",
        "--n-examples", "8", "--batch-size", "8"]


@pytest.fixture(scope="module")
def trained(fmnist_root, tmp_path_factory):
    """One finished training run (tiny_cnn, 1,024 real images, one epoch, no AutoAttack): copy it, never change it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = tiny_recipe(fmnist_root, data={"subset": 1024}, optim={"name": "adamw", "lr": 0.01, "weight_decay": 0.0})
    trainers.train(cfg, run)
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the training run; its checkpoint is run / "checkpoints" / "final.pt"."""
    return shutil.copytree(trained, tmp_path / "run")


def snapshot(folder):
    """Every file and folder under ``folder`` with its bytes and modification time; None if it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def eval_(ckpt, out=None, *extra):
    return cli.main(["eval", str(ckpt), *EVAL, *(["--out", str(out)] if out is not None else []), *extra])


def first_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""  # a refusal prints nothing else, not even the header
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def finished_eval(run, out, capsys):
    assert eval_(run / "checkpoints" / "final.pt", out) == 0
    capsys.readouterr()
    return snapshot(out)


# ---------------------------------------------------------------- 1. a training run's folder is never an eval's --out

@pytest.mark.parametrize("kind", ["run", "config.yaml", "results.json"])
def test_an_out_holding_a_training_run_is_refused(run, tmp_path, capsys, kind):
    ckpt = run / "checkpoints" / "final.pt"
    if kind == "run":
        out, mark = run, "it has checkpoints/"
    else:  # a folder with only one sign of a training run
        out = tmp_path / "other"
        out.mkdir()
        shutil.copy(run / kind, out / kind)
        mark = "it has config.yaml" if kind == "config.yaml" else None
    before, parent = snapshot(out), snapshot(run.parent)
    assert eval_(ckpt, out) == 2
    advice = f"leave out --out to write to {run / 'eval_final'}, or choose another --out"
    what = (f"is a training run's folder ({mark}); an eval there would overwrite its results.json" if mark
            else "holds a results.json that advgkl eval did not write")
    assert first_error(capsys) == f"advgkl eval: error: {out} {what}; {advice}"
    assert snapshot(out) == before and snapshot(run.parent) == parent  # results.json, metrics.jsonl untouched
    assert not (run / "eval_final").exists()


def test_eval_results_are_marked_as_such(run, tmp_path, capsys):
    out = tmp_path / "ev"
    assert eval_(run / "checkpoints" / "final.pt", out) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["job"] == "eval"
    assert "job" not in json.loads((run / "results.json").read_text())  # training's results are told apart


# ---------------------------------------------------------------- 2. the output folder is locked

def test_a_second_eval_into_a_locked_folder_is_refused(run, tmp_path, capsys):
    out = tmp_path / "ev"
    with RunLock(out):  # another advgkl job holds the folder
        before = snapshot(out)
        assert eval_(run / "checkpoints" / "final.pt", out) == 2
        assert first_error(capsys) == (f"advgkl eval: error: {out} is in use by another advgkl job (lock held on "
                                       f"{out / '.lock'})")
        assert snapshot(out) == before == {".lock": (b"", before[".lock"][1])}


def test_an_eval_holds_its_folders_lock_while_it_runs(run, tmp_path, capsys, monkeypatch):
    out, seen = tmp_path / "ev", []
    real = evaluate.evaluate_model

    def evaluate_model(*args, **kw):
        try:
            with RunLock(out):
                seen.append("free")
        except UserError as e:
            seen.append(str(e))
        return real(*args, **kw)

    monkeypatch.setattr(evaluate, "evaluate_model", evaluate_model)
    assert eval_(run / "checkpoints" / "final.pt", out) == 0
    assert seen == [f"{out} is in use by another advgkl job (lock held on {out / '.lock'})"]
    with RunLock(out):  # released at the end
        pass


# ---------------------------------------------------------------- 3. an existing eval needs --resume

def test_rerunning_a_finished_eval_needs_resume_and_then_reports_it_untouched(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ev"
    before = finished_eval(run, out, capsys)
    saved = json.loads((out / "results.json").read_text())

    assert eval_(run / "checkpoints" / "final.pt", out) == 2
    assert first_error(capsys) == (f"advgkl eval: error: {out} already holds an evaluation (results.json, "
                                   "metrics.jsonl, autoattack_state_final.pt); pass --resume to continue it, or "
                                   "choose another --out")
    assert snapshot(out) == before

    def no_attack(*a, **kw):
        raise AssertionError("a finished evaluation was attacked again")

    monkeypatch.setattr(evaluate, "evaluate_model", no_attack)
    monkeypatch.setattr(attacks, "_run_attack", no_attack)
    assert eval_(run / "checkpoints" / "final.pt", out, "--resume") == 0
    printed = capsys.readouterr().out.splitlines()
    ckpt = (run / "checkpoints" / "final.pt").resolve()
    assert printed[0] == (f"advgkl eval: {out} already holds this finished evaluation of {ckpt}; re-reporting its "
                          "saved results (nothing is re-run)")
    wall = saved["evaluations"]["model"]["eval_wall_time_s"]
    assert printed[1] == (f"[final] clean {saved['clean_acc']:.4f}  AutoAttack (custom) {saved['autoattack_acc']}  "
                          f"on 8 points in {wall:.1f}s")
    assert printed[2].startswith(f"results: {out / 'results.json'}  clean_acc={saved['clean_acc']:.4f}")
    assert snapshot(out) == before  # same bytes, same times: the recorded wall times are the first run's


def test_resuming_with_other_settings_or_weights_is_refused(run, tmp_path, capsys):
    out = tmp_path / "ev"
    before = finished_eval(run, out, capsys)
    assert eval_(run / "checkpoints" / "final.pt", out, "--resume", "--n-examples", "4") == 2
    assert first_error(capsys) == (f"advgkl eval: error: {out} holds another evaluation (eval.n_examples: saved 8 vs "
                                   "now 4); choose another --out")
    other = run / "checkpoints" / "last.pt"  # same recipe, other weights
    assert eval_(other, out, "--resume") == 2
    assert first_error(capsys) == (f"advgkl eval: error: {out} holds another evaluation (checkpoint: saved "
                                   f"{(run / 'checkpoints' / 'final.pt').resolve()} vs now {other.resolve()} (other "
                                   "weights)); choose another --out")
    assert snapshot(out) == before


def test_an_interrupted_eval_needs_resume_and_continues_from_its_state(run, tmp_path, capsys, monkeypatch):
    ckpt = run / "checkpoints" / "final.pt"
    small = ["--n-examples", "32", "--batch-size", "2"]  # several chunks of 2 clean-correct points
    assert eval_(ckpt, tmp_path / "whole", *small) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    n_chunks = -(-sum(whole["per_point"]["model"]["clean_correct"]) // 2)
    assert n_chunks >= 3

    real, calls = attacks._run_attack, []

    def killed_in_chunk_2(aa, name, xb, yb):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(aa, name, xb, yb)

    out = tmp_path / "ev"
    monkeypatch.setattr(attacks, "_run_attack", killed_in_chunk_2)
    assert eval_(ckpt, out, *small) == 130
    capsys.readouterr()
    state = out / "autoattack_state_final.pt"
    assert sorted(p.name for p in out.iterdir()) == [".lock", state.name]  # no results.json, no metrics yet
    before = snapshot(out)

    assert eval_(ckpt, out, *small) == 2
    assert first_error(capsys) == (f"advgkl eval: error: {out} already holds an evaluation ({state.name}); pass "
                                   "--resume to continue it, or choose another --out")
    assert snapshot(out) == before

    calls.clear()
    monkeypatch.setattr(attacks, "_run_attack", lambda *a: (calls.append(a[1]), real(*a))[1])
    assert eval_(ckpt, out, *small, "--resume") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[3] == f"  resuming from {state}"
    assert len(calls) == n_chunks - 1  # the finished chunk is not attacked again
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["per_point"] == whole["per_point"]
    assert resumed["per_attack_robust_acc"] == whole["per_attack_robust_acc"]


# ---------------------------------------------------------------- 4. AutoAttack state messages fit the CLI

def interrupted_eval_folder(run, tmp_path, capsys, content=None):
    """An eval folder as a killed eval leaves it: .lock and the AutoAttack state (or ``content`` in its place)."""
    finished = tmp_path / "finished"
    finished_eval(run, finished, capsys)
    out = tmp_path / "ev"
    out.mkdir()
    shutil.copy(finished / ".lock", out / ".lock")
    state = out / "autoattack_state_final.pt"
    data = (finished / state.name).read_bytes()
    state.write_bytes(data if content is None else content(data))
    return out, state


def test_a_state_of_another_evaluation_is_one_line_with_cli_advice(run, tmp_path, capsys):
    out, state = interrupted_eval_folder(run, tmp_path, capsys)
    before = snapshot(out)
    assert eval_(run / "checkpoints" / "final.pt", out, "--resume", "--batch-size", "4") == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"advgkl eval: error: AutoAttack state {state} belongs to a different "
                                         "evaluation (batch_size: state 8 vs now 4); delete it or choose another --out"]
    assert snapshot(out) == before  # the state is kept, no results, no metrics, no W&B files


class Foreign:
    """A class outside weights_only's allowlist: torch's refusal advises weights_only=False, which we never repeat."""


def _foreign_pickle(_data: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"format": 1, "object": Foreign()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("content,why", [
    (lambda data: data[:300], "PytorchStreamReader failed reading zip archive: failed finding central directory"),
    (_foreign_pickle, "safe loading refused it: not a tensor file that advgkl wrote"),
    (lambda data: b"", "the file is empty or cut short"),
], ids=["torn", "foreign-pickle", "empty"])
def test_an_unreadable_state_is_one_line_without_unsafe_advice(run, tmp_path, capsys, content, why):
    out, state = interrupted_eval_folder(run, tmp_path, capsys, content)
    before = snapshot(out)
    assert eval_(run / "checkpoints" / "final.pt", out, "--resume") == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"advgkl eval: error: cannot read AutoAttack state {state} ({why}); delete it "
                                         "or choose another --out"]
    assert "weights_only" not in captured.err and "weights_only" not in captured.out
    assert snapshot(out) == before


# ---------------------------------------------------------------- 5. weights of another architecture

def test_weights_of_another_architecture_name_the_keys(run, tmp_path, capsys):
    ckpt = load_checkpoint(run / "checkpoints" / "final.pt")
    raw = json.loads(json.dumps(ckpt["config"]))
    raw["model"]["name"] = "mini_cnn"
    ckpt["model"] = build_model(from_saved(raw)).state_dict()
    path = tmp_path / "other_arch.pt"
    torch.save(ckpt, path)
    before = snapshot(tmp_path)
    assert eval_(path) == 2
    assert first_error(capsys) == (
        f"advgkl eval: error: {path}: weights do not fit model tiny_cnn (missing 2: net.8.weight, net.8.bias; "
        "unexpected 6: net.6.weight, net.6.bias, net.10.weight (+3 more); shape mismatch 4: net.0.weight checkpoint "
        "[16, 1, 3, 3] vs model [8, 1, 3, 3], net.0.bias checkpoint [16] vs model [8], net.3.weight checkpoint "
        "[32, 16, 3, 3] vs model [16, 8, 3, 3] (+1 more))")
    assert snapshot(tmp_path) == before  # no eval folder


# ---------------------------------------------------------------- 6. what eval prints

def test_eval_prints_a_header_before_it_starts(run, tmp_path, capsys, monkeypatch):
    out, printed_first = tmp_path / "ev", []
    real = evaluate.evaluate_model

    def evaluate_model(*args, **kw):
        printed_first.append(capsys.readouterr().out)
        return real(*args, **kw)

    monkeypatch.setattr(evaluate, "evaluate_model", evaluate_model)
    assert eval_(run / "checkpoints" / "final.pt", out) == 0
    assert printed_first[0].splitlines() == [
        f"advgkl eval {(run / 'checkpoints' / 'final.pt').resolve()} (model weights, tiny_cnn) -> {out}",
        "  fashion_mnist, first 8 test points, threat model Linf eps 0.1, device cpu",
        f"  AutoAttack custom: apgd-ce (batch 8, seed 0, pyautoattack {version('pyautoattack')}); no gradient-masking "
        "checks",
    ]


def test_gradient_masking_checks_show_progress_when_progress_is_on(run, tmp_path, capsys):
    ckpt = load_checkpoint(run / "checkpoints" / "final.pt")
    ckpt["config"]["logging"]["progress"] = True
    ckpt["config"]["eval"].update(honesty_checks=True, honesty_pgd_steps=1)
    path = tmp_path / "checkpoints" / "progress.pt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    assert eval_(path) == 0
    captured = capsys.readouterr()
    assert "then gradient-masking checks (PGD-1)" in captured.out.splitlines()[2]
    assert "gradient-masking checks: 100%" in captured.err  # 6 radii x 1 batch of 8 points
    assert "| 6/6 " in captured.err and "AutoAttack: 100%" in captured.err


def test_gradient_masking_checks_are_silent_without_progress(trained_tiny_fmnist, capsys):
    t = trained_tiny_fmnist
    quiet = honesty.check(t.model, t.x[:8], t.y[:8], eps=0.1, norm="Linf", steps=1, batch_size=4)
    assert capsys.readouterr().err == ""
    shown = honesty.check(t.model, t.x[:8], t.y[:8], eps=0.1, norm="Linf", steps=1, batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert "gradient-masking checks: 100%" in err and "| 12/12 " in err  # 6 radii x 2 batches
    assert shown["pgd_acc_by_eps"].keys() == quiet["pgd_acc_by_eps"].keys()


# ---------------------------------------------------------------- 7. the checkpoint is recorded by absolute path

def test_results_record_the_checkpoint_by_absolute_path(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(run.parent)
    assert eval_("run/checkpoints/final.pt", "ev") == 0
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    ckpt = run / "checkpoints" / "final.pt"
    assert saved["checkpoint"] == str(ckpt.resolve()) and saved["checkpoint"].startswith("/")
    assert saved["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


# ---------------------------------------------------------------- 8. --device cuda without a GPU

def test_cuda_without_a_gpu_names_the_flag(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "ev"
    assert cli.main(["eval", str(run / "checkpoints" / "final.pt"), "--out", str(out), "--device", "cuda",
                     "--wandb", "disabled"]) == 2
    assert first_error(capsys) == "advgkl eval: error: --device cuda but CUDA is not available here; use --device cpu"
    assert not out.exists()


def test_more_points_than_the_test_set_are_refused_before_anything_is_written(run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", str(run / "checkpoints" / "final.pt"), "--out", str(out), "--n-examples", "20000",
                     "--wandb", "disabled", "--device", "cpu"]) == 2
    assert first_error(capsys) == ("advgkl eval: error: eval.n_examples=20000: the fashion_mnist test set has "
                                   "10000 points (0 = all)")
    assert not out.exists()
