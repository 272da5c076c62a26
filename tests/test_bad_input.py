"""Every input a careless or hostile user can give is refused up front with one `error:` line that names the flag
or the file, exit status 2 and no traceback; nothing of theirs is deleted, and nothing outside the corpus is read.

Scripts run in-process through runtime.run_cli, exactly as their `__main__` does: an uncaught exception (what a
user would see as a traceback) fails the test by propagating. A few cases also run as real subprocesses."""

import json
import os
import shutil
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import hub
import runtime
import sample
import synth
import train
import transfer
from conftest import SIZE, run_script, train_args

MAINS = {"synth.py": synth.synthesize, "train.py": train.main, "sample.py": sample.main, "transfer.py": transfer.main}


def cli(capsys, script: str, *args) -> tuple[int, str]:
    """(exit status, stderr) of a script's CLI, run in-process as its __main__ runs it."""
    capsys.readouterr()
    try:
        runtime.run_cli(MAINS[script], [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def refused(capsys, script: str, *args, names: str) -> str:
    """Run a CLI that must refuse its input: status 2, an `error:` line naming `names`, no traceback."""
    code, err = cli(capsys, script, *args)
    assert code == runtime.EXIT_USER_ERROR, err
    assert "Traceback" not in err and "error" in err and names in err, err
    return err


@pytest.fixture
def data(corpus, tmp_path):
    """A private copy of the tiny corpus that a test may damage."""
    return shutil.copytree(corpus, tmp_path / "data")


def rewrite_rows(data, change) -> None:
    path = data / runtime.CORPUS_METADATA
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------
# Values: finite, in range, and 0 is a value, never "unset"


@pytest.mark.parametrize("script, flag, value", [
    ("synth.py", "--guidance", "nan"),
    ("synth.py", "--guidance", "inf"),
    ("synth.py", "--guidance", "-1"),
    ("synth.py", "--h", "0"),
    ("synth.py", "--images-per-prompt", "0"),
    ("synth.py", "--steps", "0"),
    ("sample.py", "--shift", "-1"),
    ("sample.py", "--shift", "0"),
    ("sample.py", "--steps", "0"),
    ("sample.py", "--w", "-16"),
    ("sample.py", "--memory-budget", "nan"),
    ("train.py", "--blocks", "-2"),
    ("train.py", "--lr", "inf"),
    ("train.py", "--ema", "1.5"),
    ("train.py", "--train-shift", "0"),
    ("train.py", "--dtype", "float64"),
    ("sample.py", "--dtype", "bf32"),
    ("transfer.py", "--dtype", "int8"),
])
def test_a_value_that_is_not_one_is_refused(capsys, pipeline_dir, script, flag, value):
    refused(capsys, script, "--ckpt", pipeline_dir, flag, value, names=flag)


def test_a_head_tile_must_be_a_multiple_of_16(capsys, pipeline_dir):
    refused(capsys, "sample.py", "--ckpt", pipeline_dir, "--prompt", "x", "--head-tile", "40", names="--head-tile 40")


@pytest.mark.parametrize("line, why", [("42", "a string"), ('{"prompt": null}', "a string"),
                                       ('{"prompt": 7}', "a string"), ("{not json", "not JSON")])
def test_a_prompt_file_row_that_is_not_text_is_refused(capsys, pipeline_dir, tmp_path, line, why):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n' + line + "\n")
    err = refused(capsys, "synth.py", "--ckpt", pipeline_dir, "--prompts", prompts, "--out", tmp_path / "out",
                  names=f"{prompts}:2")
    assert why in err and not (tmp_path / "out").exists()


def test_a_prompt_file_that_is_not_utf8_names_its_line(capsys, pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe broken\n")
    refused(capsys, "sample.py", "--ckpt", pipeline_dir, "--prompts", prompts, names=f"{prompts}:2: not UTF-8")


# ----------------------------------------------------------------------------------------------------
# The corpus: rows name files inside it, and every row is checked before any weight loads


def test_a_row_outside_the_corpus_is_refused_and_never_opened(capsys, pipeline_dir, data, tmp_path, monkeypatch):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (96, 64)).save(secret)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    for name in (str(secret), "../secret.png"):
        rewrite_rows(data, lambda rows: rows[3].update(file=name))
        refused(capsys, "train.py", *train_args(pipeline_dir, data, tmp_path / "run"),
                names=f"metadata.jsonl:4: image {name!r} is not a path inside the corpus folder")
    assert not any("secret" in path for path in opened)


def test_a_link_that_leads_out_of_the_corpus_is_refused(capsys, pipeline_dir, data, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (96, 64)).save(secret)
    (data / "link.png").symlink_to(secret)
    rewrite_rows(data, lambda rows: rows[0].update(file="link.png"))
    refused(capsys, "train.py", *train_args(pipeline_dir, data, tmp_path / "run"),
            names="metadata.jsonl:1: image 'link.png' is a link that leads outside the corpus folder")


@pytest.mark.parametrize("damage, names", [
    (lambda data, rows: (data / rows[2]["file"]).write_bytes(b"not an image"), "metadata.jsonl:3:"),
    (lambda data, rows: Image.new("RGB", (32, 32)).save(data / rows[2]["file"]), "the image is 32x32"),
    (lambda data, rows: rows[2].pop("seed"), "metadata.jsonl:3: needs an integer seed"),
    (lambda data, rows: rows[2].update(prompt=None), "metadata.jsonl:3: the prompt must be text"),
])
def test_a_bad_row_is_refused_before_training(capsys, pipeline_dir, data, tmp_path, damage, names):
    rewrite_rows(data, lambda rows: damage(data, rows))
    refused(capsys, "train.py", *train_args(pipeline_dir, data, tmp_path / "run"), names=names)
    assert not (tmp_path / "run" / "latest").exists()


def test_a_bad_metadata_line_is_named(capsys, pipeline_dir, data, tmp_path):
    path = data / runtime.CORPUS_METADATA
    path.write_text(path.read_text() + "{broken\n")
    refused(capsys, "train.py", *train_args(pipeline_dir, data, tmp_path / "run"), names=f"{path}:9: not JSON")


def test_an_image_that_breaks_mid_run_stops_with_the_steps_saved(capsys, pipeline_dir, data, tmp_path):
    """A file whose header reads but whose data is cut is found only when decoded: training stops there with a
    clean error naming it, after saving the steps made so far."""
    rows = [json.loads(line) for line in (data / runtime.CORPUS_METADATA).read_text().splitlines()]
    order = [i for step in range(3) for _, i in train.global_batch(step, 1, len(rows), seed=0)]
    assert order[2] not in order[:2]
    broken = data / rows[order[2]]["file"]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    err = refused(capsys, "train.py", *train_args(pipeline_dir, data, tmp_path / "run", "--steps", "4"),
                  names=f"{broken}: the image cannot be decoded")
    assert (tmp_path / "run" / "latest").read_text() == "step-000002" and "saved" in err


def test_duplicates_and_a_foreign_source_are_reported(capsys, pipeline_dir, data, tmp_path):
    rewrite_rows(data, lambda rows: (rows.append(dict(rows[0])), rows[1].update(transformer_sha256="f" * 64)))
    code, err = cli(capsys, "train.py", *train_args(pipeline_dir, data, tmp_path / "run", "--steps", "1"))
    assert code == 0, err
    assert "warning: --data" in err and "1 rows name an image another row names too" in err
    assert "made by a source whose transformer weights hash to ffffffffffff" in err


# ----------------------------------------------------------------------------------------------------
# Runs and checkpoints


def test_pruning_deletes_only_what_train_wrote(capsys, pipeline_dir, corpus, tmp_path):
    out = tmp_path / "run"
    (out / "step-000030.bak").mkdir(parents=True)
    (out / "step-000030.bak" / "mine.txt").write_text("a user's copy")
    (out / "step-000031").write_text("a file that matches the old pattern")
    code, err = cli(capsys, "train.py", *train_args(pipeline_dir, corpus, out, "--steps", "4", "--save-every", "1",
                                                    "--keep", "1"))
    assert code == 0, err
    assert (out / "step-000030.bak" / "mine.txt").read_text() == "a user's copy"
    assert (out / "step-000031").is_file()
    assert sorted(p.name for p in out.glob("step-0000??") if p.is_dir()) == ["step-000004"]


def test_a_killed_save_leaves_nothing_in_the_published_folder(pipeline_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "1"))
    stale = out / f".step-000002.{os.getpid()}.tmp"  # what a save killed part-way leaves
    stale.mkdir()
    (stale / ".model.safetensors.12345.tmp").write_bytes(b"half a file")
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "2"))
    assert sorted(p.name for p in (out / "step-000002").iterdir()) == ["model.safetensors", "state.safetensors"]


def test_a_resume_logs_each_step_once(pipeline_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "4", "--save-every", "2"))
    (out / "latest").write_text("step-000002")  # as if killed after logging steps 3 and 4, before saving 4
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "4", "--save-every", "2"))
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_latest_naming_a_missing_step_is_named(capsys, pipeline_dir, corpus, tmp_path, script):
    out = tmp_path / "run"
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "1"))
    (out / "latest").write_text("step-000099")
    args = train_args(pipeline_dir, corpus, out) if script == "train.py" else ["--ckpt", out, "--prompt", "x"]
    refused(capsys, script, *args, names="`latest` names 'step-000099'")


def test_a_run_without_its_args_file_is_not_resumed_blindly(capsys, pipeline_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train.train(train_args(pipeline_dir, corpus, out, "--steps", "1"))
    (out / "args.json").unlink()
    refused(capsys, "train.py", *train_args(pipeline_dir, corpus, out, "--steps", "2"), names="no readable args.json")


def test_two_runs_on_one_folder(capsys, pipeline_dir, corpus, prompt_file, tmp_path):
    for script, args in (("train.py", train_args(pipeline_dir, corpus, tmp_path / "run")),
                         ("synth.py", ["--ckpt", pipeline_dir, "--prompts", prompt_file, "--out", tmp_path / "data"])):
        out = tmp_path / ("run" if script == "train.py" else "data")
        out.mkdir()
        with runtime.folder_lock(out):  # another job holds the folder
            refused(capsys, script, *args, names=f"--out {out}: in use by pid {os.getpid()}")


@pytest.mark.slow
def test_a_lock_from_a_killed_run_is_taken_over(pipeline_dir, corpus, tmp_path):
    """The kernel drops a killed process's lock; the lock file it leaves is no obstacle."""
    out = tmp_path / "run"
    proc = run_script("train.py", *train_args(pipeline_dir, corpus, out, "--steps", "500"), popen=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.communicate()
    assert (out / runtime.LOCK_FILE).exists()
    assert train.train(train_args(pipeline_dir, corpus, out, "--steps", "1"))["step"] >= 1


# ----------------------------------------------------------------------------------------------------
# Checkpoint and output arguments


def test_files_that_are_not_l2p_checkpoints(capsys, pipeline_dir, tmp_path):
    garbage, truncated, ordinary = tmp_path / "garbage.safetensors", tmp_path / "cut.safetensors", tmp_path / "x.safetensors"
    garbage.write_bytes(os.urandom(256))
    save_file({"w": torch.zeros(64, 64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    save_file({"w": torch.zeros(2)}, ordinary, metadata={"format": "pt"})  # what diffusers / transformers write
    for path, why in ((garbage, "not a readable safetensors file"), (truncated, "not a readable safetensors file"),
                      (ordinary, "not an L2P checkpoint")):
        refused(capsys, "sample.py", "--ckpt", path, "--source", pipeline_dir, "--prompt", "x", names=f"{path}: {why}")


def test_a_diffusers_component_folder_is_named_as_such(capsys, pipeline_dir):
    refused(capsys, "sample.py", "--ckpt", pipeline_dir / "transformer", "--prompt", "x",
            names="a diffusers folder, not an L2P checkpoint")


def test_output_paths_that_cannot_take_the_output(capsys, pipeline_dir, corpus, tmp_path):
    run = tmp_path / "run"
    train.train(train_args(pipeline_dir, corpus, run, "--steps", "1"))
    folder = tmp_path / "already.png"
    folder.mkdir()
    refused(capsys, "sample.py", "--ckpt", pipeline_dir, "--prompt", "x", "--h", "32", "--w", "32", "--out", folder,
            names=f"--out {folder}: is a folder")
    refused(capsys, "transfer.py", "--export", run, "--out", tmp_path, names=f"--out {tmp_path}: is a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: a file in the way instead
        locked = tmp_path / "a-file"
        locked.write_text("in the way")
    refused(capsys, "transfer.py", "--export", run, "--out", locked / "x.safetensors", names=f"{locked}")


def test_a_size_far_beyond_memory_is_refused_before_loading(capsys, official_release, pipeline_dir, monkeypatch):
    path, _ = official_release
    monkeypatch.setattr(transfer, "load_pixel_model", lambda *a, **k: pytest.fail("weights were loaded"))
    common = ["--ckpt", path, "--source", pipeline_dir, "--prompt", "x", "--memory-budget", "2"]
    err = refused(capsys, "sample.py", *common, "--h", "65536", "--w", "65536", names="65536x65536 needs about")
    assert "GiB more than the 2.00 GiB budget" in err and "would fit" in err
    code, err = cli(capsys, "sample.py", *common, "--h", "65536", "--w", "65536", "--dry-run")
    assert code == 0 and "GiB more than the 2.00 GiB budget" in err


# ----------------------------------------------------------------------------------------------------
# Caches follow content


def test_text_cache_follows_the_encoders_weights(pipeline_copy, tmp_path):
    features = train.TextFeatures(str(pipeline_copy), torch.float32, "cpu", tmp_path / "cache")
    before = features.path("a red circle")
    weights = pipeline_copy / "text_encoder" / "model.safetensors"
    tensors = hub.read_tensors(weights)
    save_file({k: v + 1 for k, v in tensors.items()}, weights)  # a new revision behind the same name
    after = train.TextFeatures(str(pipeline_copy), torch.float32, "cpu", tmp_path / "cache").path("a red circle")
    assert before != after


def test_hash_cache_sees_a_file_rewritten_with_its_old_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "HASH_CACHE", tmp_path / "sha256.json")
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"a" * 1000)
    first = hub.file_sha256(path)
    stat = path.stat()
    time.sleep(0.01)
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as before
    assert hub.file_sha256(path) != first


# ----------------------------------------------------------------------------------------------------
# As a user runs them: real processes


@pytest.mark.slow
def test_real_processes_print_one_error_line(pipeline_dir, tmp_path):
    for script, args, names in (("synth.py", ["--ckpt", pipeline_dir, "--guidance", "nan"], "--guidance"),
                                ("train.py", ["--ckpt", pipeline_dir, "--data", tmp_path], f"--data {tmp_path}"),
                                ("sample.py", ["--ckpt", tmp_path / "nothing", "--prompt", "x"], "nothing")):
        done = run_script(script, *map(str, args))
        assert done.returncode == runtime.EXIT_USER_ERROR and "Traceback" not in done.stderr, done.stderr
        assert "error" in done.stderr and names in done.stderr


def test_synth_runs_use_unique_temporary_names(pipeline_dir, prompt_file, tmp_path):
    out = tmp_path / "data"
    synth.synthesize(["--ckpt", str(pipeline_dir), "--prompts", str(prompt_file), "--out", str(out), *SIZE,
                      "--steps", "1", "--images-per-prompt", "1"])
    assert not list(out.glob(".*.tmp")) and len(list(out.glob("*.png"))) == 4
    with runtime.atomic_path(tmp_path / "x.txt") as tmp:
        assert str(os.getpid()) in tmp.name  # two writers of one name never share a temporary file
        tmp.write_text("whole")
    assert (tmp_path / "x.txt").read_text() == "whole" and not tmp.exists()
