"""Writing the corpus's prompts with the source's own text encoder run as a chat model (synth.py prompts).

The causal LM against transformers' Qwen3ForCausalLM on tiny random weights (logits, greedy generation with
left padding, tied and untied heads, the chat template); sampling that does not depend on the batch or the
world size; and the pipeline with a scripted test double of the model: what it keeps, what it counts, and a
killed run that resumes to the same files.
"""

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hub
import runtime
import synth
from conftest import ROOT, run_script
from fixtures import build_qwen_tokenizer, randomize, tiny_qwen3
from tokenizer import (ChatRequest, Qwen3Chat, Sampling, generate_tokens, position_ids, qwen3_chat_prompt,
                       sample_tokens)

GOLDEN_TOKENIZER = Path(__file__).parent / "golden" / "Z-Image-Turbo-SDNQ-derivative" / "tokenizer"
TOY_SOURCE = ROOT / "assets" / "toy-zimage"
PROMPT_IDS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]  # three lengths: left padding matters


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def tiny_causal_lm(seed: int = 0, **overrides):
    """transformers Qwen3ForCausalLM with fixtures.tiny_qwen3's config (tied unless overridden), random weights."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return randomize(Qwen3ForCausalLM(tiny_qwen3(seed, **overrides).config).eval(), seed, std=0.2)


def reference_logits(ref, prompts: list[list[int]]) -> torch.Tensor:
    """transformers' logits of each prompt alone (no padding), concatenated: (sum of lengths, vocab)."""
    with torch.no_grad():
        return torch.cat([ref(input_ids=torch.tensor([p])).logits[0] for p in prompts])


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :], mask[i, length - len(p) :] = torch.tensor(p), 1
    return ids, mask


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> tuple[object, Path]:
    """(the transformers oracle, a folder holding it as text_encoder/ beside a tiny Qwen3-like tokenizer/)."""
    folder = tmp_path_factory.mktemp("chat")
    ref = tiny_causal_lm()
    ref.save_pretrained(folder / "text_encoder")
    build_qwen_tokenizer(folder / "tokenizer")
    return ref, folder


def load_chat(folder: Path) -> Qwen3Chat:
    return Qwen3Chat(hub.load_qwen3_lm(folder / "text_encoder", torch.float32, "cpu"),
                     hub.load_tokenizer(folder / "tokenizer").tokenizer)


# ----------------------------------------------------------------------------------------------------
# The causal LM against transformers


def test_causal_lm_logits_match_transformers(chat_model, tmp_path):
    """Tied head; a left-padded batch gives each prompt's logits alone. Also from Z-Image's text_encoder layout (a
    Qwen3Model's keys and no lm_head.weight), from which the encoder still builds only the layers before the last."""
    ref, folder = chat_model
    assert "lm_head.weight" not in load_file(folder / "text_encoder" / "model.safetensors"), "tied: no head stored"
    ours = hub.load_qwen3_lm(folder / "text_encoder", torch.float32, "cpu")
    ids, mask = left_padded(PROMPT_IDS)
    valid = mask.bool()
    with torch.no_grad():
        got = ours(ids, valid)
        batched = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert relative_error(got[valid], reference_logits(ref, PROMPT_IDS)) < 1e-5
    assert relative_error(got[valid], batched[valid]) < 1e-5
    # RoPE only sees position differences, so shifted positions would change rounding alone: checked directly
    assert position_ids(valid).tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 2, 3, 4]]

    ref.model.save_pretrained(tmp_path / "text_encoder")
    stored = load_file(tmp_path / "text_encoder" / "model.safetensors")
    assert "norm.weight" in stored and not any(k.startswith(("model.", "lm_head")) for k in stored)
    with torch.no_grad():
        assert torch.equal(hub.load_qwen3_lm(tmp_path / "text_encoder", torch.float32, "cpu")(ids, valid), got)
    encoder = hub.load_qwen3(tmp_path / "text_encoder", torch.float32, "cpu")
    assert len(encoder.layers) == ref.config.num_hidden_layers - 1 and not hasattr(encoder, "norm")


def test_greedy_generation_matches_transformers_generate(chat_model):
    """Three prompts of different lengths in one left-padded batch, through the KV cache; a stop id ends a row."""
    ref, folder = chat_model
    ours = hub.load_qwen3_lm(folder / "text_encoder", torch.float32, "cpu")
    ids, mask = left_padded(PROMPT_IDS)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                           eos_token_id=None, pad_token_id=0)
    expected = out[:, ids.shape[1] :].tolist()
    got = generate_tokens(ours, PROMPT_IDS, [0, 1, 2], [Sampling(12)] * 3, stop_ids=[], pad_id=0)
    assert got == expected
    assert len({tuple(row) for row in expected}) == 3

    stop = expected[0][4]
    ends = [row.index(stop) + 1 if stop in row else len(row) for row in expected]
    stopped = generate_tokens(ours, PROMPT_IDS, [0, 1, 2], [Sampling(12)] * 3, stop_ids=[stop], pad_id=0)
    assert stopped == [row[:end] for row, end in zip(expected, ends)] and ends[0] <= 5


def test_untied_head_loads_and_a_head_that_disagrees_with_the_config_is_refused(tmp_path):
    ref = tiny_causal_lm(seed=3, tie_word_embeddings=False)
    ref.save_pretrained(tmp_path / "untied")
    ours = hub.load_qwen3_lm(tmp_path / "untied", torch.float32, "cpu")
    ids, mask = left_padded(PROMPT_IDS)
    with torch.no_grad():
        assert relative_error(ours(ids, mask.bool())[mask.bool()], reference_logits(ref, PROMPT_IDS)) < 1e-5
    assert not torch.equal(ours.lm_head.weight, ours.embed_tokens.weight)

    tensors = load_file(tmp_path / "untied" / "model.safetensors")
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    tied = tmp_path / "tied-config"
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    save_file(tensors, tied / "model.safetensors")
    with pytest.raises(hub.CheckpointError, match="tie_word_embeddings true, but the stored lm_head.weight differs"):
        hub.load_qwen3_lm(tied, torch.float32, "cpu")
    copy = tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"].clone()}  # older transformers saved it
    save_file(copy, tied / "model.safetensors")
    assert hub.load_qwen3_lm(tied, torch.float32, "cpu").lm_head is None

    headless = tmp_path / "no-head"
    headless.mkdir()
    (headless / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, headless / "model.safetensors")
    with pytest.raises(hub.CheckpointError, match="tie_word_embeddings false .* there is no lm_head.weight"):
        hub.load_qwen3_lm(headless, torch.float32, "cpu")


def test_chat_prompt_is_qwen3_chat_template_without_thinking(tmp_path):
    """Rendered as the real tokenizer_config.json's template does with a system and a user turn,
    add_generation_prompt=True and enable_thinking=False."""
    from transformers import AutoTokenizer

    template = json.loads((GOLDEN_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(build_qwen_tokenizer(tmp_path))
    user = json.dumps({"sub_class": "Posters", "subject": "jazz night \"LIVE\""})
    expected = tokenizer.apply_chat_template([{"role": "system", "content": synth.WRITER_SYSTEM},
                                              {"role": "user", "content": user}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert qwen3_chat_prompt(synth.WRITER_SYSTEM, user) == expected


# ----------------------------------------------------------------------------------------------------
# Sampling


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (renormalised to 0.625, 0.375);
    each row uses its own temperature, top_p and uniform draw; temperature 0 is the argmax."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(6, 4)
    temperature = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    top_p = torch.tensor([0.75, 0.75, 0.75, 1.0, 0.75, 0.4])
    uniform = torch.tensor([0.6, 0.63, 0.999, 0.999, 0.999, 0.999])
    assert sample_tokens(logits, temperature, top_p, uniform).tolist() == [0, 1, 1, 3, 0, 0]


def test_replies_do_not_depend_on_the_batch(chat_model):
    """Each request draws from its own seeded generator: alone, in one batch or split, the same replies."""
    _, folder = chat_model
    chat = load_chat(folder)
    samplings = [Sampling(20, 0.0), Sampling(14, 0.7, 0.8), Sampling(9, 1.0), Sampling(17, 1.3, 0.5),
                 Sampling(12, 0.9, 0.95)]
    requests = [ChatRequest("You write prompts.", "a cat " * (i + 1), seed=100 + i, sampling=s)
                for i, s in enumerate(samplings)]
    together = chat.generate(requests)
    assert [chat.generate([r])[0] for r in requests] == together
    assert chat.generate(requests[:2]) + chat.generate(requests[2:]) == together
    assert len(set(together)) == len(together)
    reseeded = ChatRequest(requests[1].system, requests[1].user, seed=7, sampling=requests[1].sampling)
    assert chat.generate([reseeded]) != together[1:2], "a sampled reply follows its seed"


class JsonWriter:
    """The tiny random model's replies made into ones the pipeline keeps: a write becomes a record quoting the
    sampled text, an audit passes, an expansion's words become categories. What is kept is then what was sampled."""

    def __init__(self, chat):
        self.chat = chat

    def generate(self, requests: list[ChatRequest]) -> list[str]:
        return [self.wrap(r, text) for r, text in zip(requests, self.chat.generate(requests))]

    @staticmethod
    def wrap(request: ChatRequest, text: str) -> str:
        words = " ".join(text.split())
        if request.system == synth.EXPANDER_SYSTEM:
            return json.dumps({"categories": [words[:12], words[12:24], words[24:36]]})
        if request.system == synth.AUDITOR_SYSTEM:
            return '{"is_valid": true, "reason": "ok"}'
        return json.dumps({"prompt": f'Scene of "{words[:120]}" in soft light, as the tiny model wrote it.'})


SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import synth
from test_prompt_writer import {lm}
synth.write_prompts({argv!r}, lm={lm_args})
"""


def corpus_files(out: Path) -> dict[str, str]:
    """Every result file of a prompts folder (not the settings, which name no rank or batch)."""
    files = [out / synth.PROMPTS_FILE, out / synth.STATS_FILE, *out.glob("slots/*.json"), *out.glob("categories/*")]
    return {str(f.relative_to(out)): f.read_text() for f in files}


@pytest.mark.slow
def test_same_prompts_whatever_the_batch_and_world_size(chat_model, tmp_path):
    """The tiny model's sampled texts, kept by JsonWriter: 2 ranks under torchrun with 4 requests per batch, and 1
    process with 7, write the same files."""
    _, folder = chat_model
    argv = ["--ckpt", "tiny", "--n", "8", "--attempts", "1", "--fine-categories", "3"]
    script = tmp_path / "write.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), lm="JsonWriter, load_chat",
                                    argv=argv + ["--out", str(tmp_path / "two"), "--batch-size", "4"],
                                    lm_args=f"JsonWriter(load_chat(__import__('pathlib').Path({str(folder)!r})))"))
    two = run_script(str(script), nproc=2)
    assert two.returncode == 0, two.stderr
    synth.write_prompts(argv + ["--out", str(tmp_path / "one"), "--batch-size", "7"], lm=JsonWriter(load_chat(folder)))
    one, ranks = corpus_files(tmp_path / "one"), corpus_files(tmp_path / "two")
    assert one == ranks
    prompts = [json.loads(line)["prompt"] for line in one[synth.PROMPTS_FILE].splitlines()]
    assert len(prompts) == 8 and len(set(prompts)) == 8


# ----------------------------------------------------------------------------------------------------
# The pipeline, with a scripted model

SUBJECTS = ("plain", "flaky", "dup", "unsafe", "broken", "short")
OUTCOMES = {"broken": "malformed_json", "short": "too_short", "unsafe": "audit_safety"}  # rejected at every attempt


def scripted_prompt(subject: str, seed: int) -> str:
    if subject == "dup":
        return 'A still life with a card saying "SAME" on an oak table, lit by one soft window.'
    mark = "UNSAFE" if subject == "unsafe" else "OPEN"
    return f'Wide view of a {subject} scene with a sign reading "{mark}" under soft light, variation {seed}.'


class ScriptedLM:
    """A test double of the chat model, by request and subject: "plain" (and the Cartoon sub-class, whose expansion
    is always cut off) writes a new valid prompt per request; "flaky" is cut off until told of its rejection; "dup"
    always writes the same prompt; "unsafe" fails the audit; "broken" is cut off; "short" breaks the length rule.
    Replies wrapped in words or a markdown fence are fine. `kill_after`: SIGKILL itself at that call."""

    def __init__(self, kill_after: int | None = None):
        self.kill_after, self.calls = kill_after, 0

    @staticmethod
    def subjects(sub: synth.SubClass) -> list[str]:
        """The fine categories of a sub-class, rotated so that the first slots meet every subject."""
        k = synth.TAXONOMY.index(sub) % len(SUBJECTS)
        return list(SUBJECTS[k:] + SUBJECTS[:k])

    def generate(self, requests: list[ChatRequest]) -> list[str]:
        self.calls += 1
        if self.calls == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return [self.reply(r) for r in requests]

    def reply(self, request: ChatRequest) -> str:
        fields = json.loads(request.user)
        if request.system == synth.EXPANDER_SYSTEM:
            if fields["sub_class"] == "Cartoon":
                return '{"categories": ["unfinished'
            sub = next(s for s in synth.TAXONOMY if (s.major, s.name) == (fields["major_class"], fields["sub_class"]))
            return "Here they are:\n" + json.dumps({"categories": self.subjects(sub) + ["Plain!"]})  # "Plain!": a dup
        if request.system == synth.AUDITOR_SYSTEM:
            if "UNSAFE" in fields["prompt"]:
                return '{"is_valid": false, "reason": "Safety: shows violence"}'
            return '```json\n{"is_valid": true, "reason": "ok"}\n```'
        subject = fields["subject"]
        if subject == "broken" or (subject == "flaky" and "previous_attempt_rejected_for" not in fields):
            return '{"prompt": "cut off'
        if subject == "short":
            return '{"prompt": "Too short."}'
        return json.dumps({"prompt": scripted_prompt(subject, request.seed)})


def expected_corpus(n: int, attempts: int, seed: int) -> tuple[list[dict], dict]:
    """What the script must give: slots in order, each subject's fate, the first n distinct prompts."""
    fine = {sub.category: [sub.name] if sub.name == "Cartoon" else ScriptedLM.subjects(sub) for sub in synth.TAXONOMY}
    records, reasons, by_category = [], Counter(), {sub.category: {"kept": 0, "rejected": 0} for sub in synth.TAXONOMY}
    slots = 0
    while len(records) < n and slots < 2 * n:
        plan = synth.plan_slot(slots, fine, seed)
        slots += 1
        counts = by_category[plan.sub.category]
        if plan.subject in OUTCOMES:
            reasons[OUTCOMES[plan.subject]] += attempts
            counts["rejected"] += attempts
            continue
        attempt = int(plan.subject == "flaky")
        reasons["malformed_json"] += attempt
        counts["rejected"] += attempt
        prompt = scripted_prompt(plan.subject, synth.request_seed(seed, "write", plan.slot, attempt))
        if prompt in [r["prompt"] for r in records]:
            reasons["duplicate"] += 1
            counts["rejected"] += 1
            continue
        records.append({"prompt": prompt, "category": plan.sub.category, "sub_category": plan.subject,
                        "variant": plan.variant})
        counts["kept"] += 1
    return records, {"prompts": len(records), "slots": slots, "by_category": by_category,
                     "rejects": dict(sorted(reasons.items()))}


@pytest.mark.parametrize("n", [12, 30])
def test_pipeline_keeps_exactly_the_valid_distinct_prompts_and_counts_the_rejects(tmp_path, n):
    """n = 12 is reached with extra slots; n = 30 is not within 2n slots, and the file holds what passed."""
    out = tmp_path / "prompts"
    path = synth.write_prompts(["--ckpt", "scripted", "--n", str(n), "--attempts", "2", "--seed", "5",
                                "--batch-size", "5", "--out", str(out)], lm=ScriptedLM())
    records, stats = expected_corpus(n, attempts=2, seed=5)
    assert (len(records) == n) == (n == 12)
    assert {"duplicate", "malformed_json", "too_short", "audit_safety"} <= set(stats["rejects"])
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    written = json.loads((out / synth.STATS_FILE).read_text())
    assert {k: written[k] for k in stats} == stats
    assert written["malformed_expansions"] == {"design/cartoon": 2} and written["fine_categories"] == 19 * 6 + 1
    assert runtime.read_prompt_file(path) == [{"prompt": r["prompt"], "category": r["category"]} for r in records]


def test_killed_run_resumes_to_the_same_files(tmp_path):
    """SIGKILL in the middle of the slots; the rerun skips the decided slots and ends with the uninterrupted run's
    files."""
    argv = ["--ckpt", "scripted", "--n", "12", "--attempts", "2", "--batch-size", "3"]
    synth.write_prompts(argv + ["--out", str(tmp_path / "clean")], lm=ScriptedLM())
    out = tmp_path / "killed"
    script = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), lm="ScriptedLM",
                           argv=argv + ["--out", str(out)], lm_args="ScriptedLM(kill_after=12)")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    slots = list(out.glob("slots/*.json"))
    assert 0 < len(slots) < 12 and len(list(out.glob("categories/*"))) == 20
    assert not (out / synth.PROMPTS_FILE).exists()
    decided = {f: f.stat().st_mtime_ns for f in slots + list(out.glob("categories/*"))}
    synth.write_prompts(argv + ["--out", str(out)], lm=ScriptedLM())
    assert corpus_files(out) == corpus_files(tmp_path / "clean")
    assert all(f.stat().st_mtime_ns == t for f, t in decided.items()), "what was decided is kept, not made again"


# ----------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.slow
def test_cli_writes_prompts_with_the_bundled_sources_text_encoder(tmp_path):
    """`python synth.py prompts` end to end with the real chat model (the toy's random one writes nothing valid),
    progress with rate and ETA on stderr; `python synth.py` without `prompts` is still the image synthesis."""
    out = tmp_path / "prompts"
    done = run_script("synth.py", "prompts", "--ckpt", str(TOY_SOURCE), "--n", "2", "--attempts", "1",
                      "--fine-categories", "2", "--out", str(out), "--batch-size", "8")
    assert done.returncode == 0, done.stderr
    assert "prompts decided" in done.stderr and "/min  ETA" in done.stderr and "wrote 0 prompts" in done.stderr
    assert json.loads((out / "synth.json").read_text())["text_sha256"]
    assert json.loads((out / synth.STATS_FILE).read_text())["rejects"]["malformed_json"] == 4
    with pytest.raises(SystemExit):
        synth.main(["--n", "3"])  # an image-synthesis flag error, not a prompts one


def error_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit:
        runtime.run_cli(synth.main, list(argv))
    assert exit.value.code == runtime.EXIT_USER_ERROR
    return capsys.readouterr().err


def test_bad_input_is_refused_before_any_work(tmp_path, capsys):
    assert "--top-p 1.5: expected a number in (0, 1]" in error_of(capsys, "prompts", "--top-p", "1.5")
    assert "argument --n: expected a positive integer, got 0" in error_of(capsys, "prompts", "--n", "0")
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert "a StableDiffusion3Pipeline, whose text encoders cannot write" in error_of(
        capsys, "prompts", "--ckpt", str(sd3), "--out", str(tmp_path / "out"))

    out = tmp_path / "prompts"
    argv = ["--ckpt", "scripted", "--n", "2", "--out", str(out)]
    synth.write_prompts(argv, lm=ScriptedLM())
    with pytest.raises(ValueError, match=r"other settings \(seed differ\)"):
        synth.write_prompts(argv + ["--seed", "1"], lm=ScriptedLM())
    with runtime.folder_lock(out), pytest.raises(ValueError, match="in use by"):
        synth.write_prompts(argv, lm=ScriptedLM())
