"""Build the training corpus with the source model itself (paper section 3.2: 10k prompts -> 20k images).

    python synth.py --ckpt Tongyi-MAI/Z-Image-Turbo --prompts prompts/l2p_taxonomy.jsonl --out data
    torchrun --nproc_per_node 8 synth.py --ckpt Tongyi-MAI/Z-Image-Turbo --prompts my_prompts.txt --out data

Image j (prompt j // images_per_prompt, its (j % images_per_prompt)-th seed) gets seed `--seed + j` and the
file `{prompt:06d}-{k}.png`. Under torchrun rank r makes the images with j % world_size == r. A PNG is
written under a temporary name and renamed when complete, and carries its own metadata row as PNG text,
so an existing file is a finished image: a killed run resumes by skipping them, with nothing lost or made
twice. When every image exists, `metadata.jsonl` (one row per image, in order) is written from the PNGs.
Defaults follow the source's recipe card, else its family's recommended inference (hub.SOURCE_DEFAULTS:
Z-Image-Turbo 8 steps, no guidance; SD3.5-Medium 40 steps, CFG 4.5; FLUX.1-schnell 4 steps; FLUX.1-dev 50 steps,
embedded guidance 3.5).

`python synth.py prompts --ckpt Tongyi-MAI/Z-Image-Turbo --n 10000` writes the prompts themselves with the source's
own text encoder (see `python synth.py prompts --help`).
"""

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generator

from PIL import Image

import hub
import runtime
import sample
from runtime import non_negative_float, positive_float, positive_int
from tokenizer import ChatRequest, Qwen3Chat, Sampling

DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "l2p_taxonomy.jsonl"
PAPER_IMAGES_PER_PROMPT = 2  # 10k prompts -> 20k images
SETTINGS_FILE = "synth.json"  # the corpus's settings; a rerun must match them


@dataclass(frozen=True)
class Job:
    index: int  # position in the corpus
    prompt: str
    category: str | None
    seed: int
    file: str


def plan_jobs(prompts: list[dict], images_per_prompt: int, seed: int) -> list[Job]:
    jobs = []
    for p, row in enumerate(prompts):
        for k in range(images_per_prompt):
            j = p * images_per_prompt + k
            jobs.append(Job(j, row["prompt"], row["category"], seed + j, f"{p:06d}-{k}.png"))
    return jobs


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_settings(out: Path, settings: dict) -> None:
    """A corpus folder holds one set of settings: resuming with others would mix two corpora."""
    path = out / SETTINGS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        differ = sorted(k for k in settings if recorded.get(k) != settings[k])
        if differ:
            raise ValueError(f"--out {out} holds a corpus made with other settings ({', '.join(differ)} differ): "
                             "use another --out, or the same settings to resume")
    else:
        runtime.write_text_atomic(path, json.dumps(settings, indent=2))


def write_metadata(out: Path, jobs: list[Job]) -> int:
    """metadata.jsonl from the PNGs' own rows, in corpus order. Every rank that finds the corpus complete may
    write it; the content is the same, and each write is atomic."""
    rows = [Image.open(out / job.file).info["l2p"] for job in jobs]
    runtime.write_text_atomic(out / runtime.CORPUS_METADATA, "".join(row + "\n" for row in rows))
    return len(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(hub.BUNDLED_SOURCE),
                   help="source model: hub id (owner/name) or diffusers folder (default: the bundled toy source)")
    p.add_argument("--prompts", type=Path, help="plain text (one per line) or JSONL with 'prompt' and optional "
                                                "'category' (default: the source's recipe card, else the bundled "
                                                "100-prompt taxonomy sample)")
    p.add_argument("--out", type=Path, default=Path("data"), help="corpus folder (PNGs + metadata.jsonl)")
    p.add_argument("--images-per-prompt", type=positive_int,
                   help=f"seeds per prompt (default: card, else {PAPER_IMAGES_PER_PROMPT})")
    p.add_argument("--h", type=positive_int, help="image height (default: the recipe card's, else 1024)")
    p.add_argument("--w", type=positive_int, help="image width (default: the recipe card's, else 1024)")
    p.add_argument("--steps", type=positive_int, help=f"Euler steps of the source (default: card, else by family: "
                                                      f"{hub.defaults_help('steps')})")
    p.add_argument("--guidance", type=non_negative_float,
                   help=f"guidance, 1 = off; FLUX-dev: its embedded guidance (default: card, else by family: "
                        f"{hub.defaults_help('guidance')})")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0; image j uses seed + j")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per forward batch on each rank")
    p.add_argument("--device", default="auto", help="auto (CUDA device LOCAL_RANK when present), cpu, cuda:N")
    p.add_argument("--dtype", default="auto", choices=runtime.DTYPE_CHOICES,
                   help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")
    return p.parse_args(argv)


def synthesize(argv=None) -> Path:
    args = parse_args(argv)
    rank, world = rank_and_world()
    configs = hub.resolve(args.ckpt, ["model_index.json", "transformer/config.json"])  # no weights yet
    pipeline_class = hub.read_pipeline_index(configs)["_class_name"]
    family = hub.source_family(hub.pipeline_transformer_config(configs / "transformer", pipeline_class))
    card = hub.recipe_card(args.ckpt)
    runtime.fill_unset(args, hub.recipe_defaults(card, "synth", hub.SIZE_DEFAULTS | hub.SOURCE_DEFAULTS[family]
                                                 | {"images_per_prompt": PAPER_IMAGES_PER_PROMPT}))
    if args.prompts is None:  # the card's prompt file lies in the source's folder
        prompts = card.get("synth", {}).get("prompts")
        args.prompts = hub.resolve(args.ckpt) / prompts if prompts else DEFAULT_PROMPTS
    jobs = plan_jobs(runtime.read_prompt_file(args.prompts), args.images_per_prompt, args.seed)
    root = hub.resolve(args.ckpt)
    hub.read_pipeline_index(root)
    runtime.check_size(args.h, args.w, hub.latent_pixel_multiple(root), "pixels per latent token")
    out = runtime.writable_folder(args.out)
    device, dtype = runtime.pick_device_dtype(args.device, args.dtype)
    with runtime.folder_lock(out) if rank == 0 else nullcontext():
        return make_images(args, jobs, out, device, dtype, rank, world)


def make_images(args, jobs: list[Job], out: Path, device, dtype, rank: int, world: int) -> Path:
    """This rank's share of the corpus, skipping finished images; metadata.jsonl once every image exists."""
    pipe = hub.load_pipeline(args.ckpt, dtype, device)
    shift = pipe.scheduler.get("shift", 1.0) if not pipe.scheduler.get("use_dynamic_shifting") else "dynamic"
    common = dict(source=pipe.name, revision=pipe.revision, transformer_sha256=pipe.transformer_sha256,
                  steps=args.steps, guidance=args.guidance, shift=shift, height=args.h, width=args.w)
    prompts_hash = hashlib.sha256(args.prompts.read_bytes()).hexdigest()
    check_settings(out, common | {"prompts_sha256": prompts_hash, "images_per_prompt": args.images_per_prompt,
                                  "seed": args.seed})

    mine = [job for job in jobs if job.index % world == rank]
    todo = [job for job in mine if not (out / job.file).exists()]
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"{tag}{len(mine) - len(todo)} of my {len(mine)} images exist; making {len(todo)} "
          f"(corpus: {len(jobs)} images)", file=sys.stderr)
    start = time.time()
    for done in range(0, len(todo), args.batch_size):
        batch = todo[done : done + args.batch_size]
        images = sample.sample_latent(pipe, [j.prompt for j in batch], [j.seed for j in batch], args.h, args.w,
                                      args.steps, args.guidance)
        for job, image in zip(batch, images):
            row = {"file": job.file, "prompt": job.prompt, "category": job.category, "seed": job.seed} | common
            runtime.save_png(image, out / job.file, row)  # atomic: a whole image or none
        n = done + len(batch)
        rate = n / (time.time() - start)
        print(f"{tag}{n}/{len(todo)} images  {rate * 60:.1f} img/min  ETA {(len(todo) - n) / rate / 60:.1f} min",
              file=sys.stderr)
    if all((out / job.file).exists() for job in jobs):
        print(f"{tag}corpus complete: wrote {write_metadata(out, jobs)} rows to {out / runtime.CORPUS_METADATA}",
              file=sys.stderr)
    else:
        print(f"{tag}my share is done; metadata.jsonl is written once every rank's images exist", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------------------
# The prompts themselves (paper section 3.2, stages 1 to 3): `python synth.py prompts --help`
#
# Z-Image's text encoder is the whole Qwen3-4B chat model (tokenizer.Qwen3CausalLM), so the source writes its own
# corpus text: (1) the taxonomy's sub-classes are expanded into fine-grained categories; (2) each prompt is written
# as a JSON record under the paper's rules; (3) a second pass, the QA auditor, judges it as {"is_valid", "reason"};
# (4) exact duplicates (normalised text) are dropped. The model is any object with `generate(requests) -> texts`
# (tokenizer.Qwen3Chat, or a scripted test double).
#
# Prompt j of the corpus is "slot" j: its sub-class, fine category, variant and checklist draws follow from j and
# the seed alone, and each request draws from its own seeded generator, so a slot's outcome does not depend on the
# batch it ran in or on the world size (exactly in float32; in bf16 a batch's shape may change the rounding, and
# so, rarely, a sampled token). A slot is written to slots/{j:06d}.json when decided (kept, or rejected --attempts
# times), atomically: a killed run resumes by skipping decided slots. Every file has one maker: rank 0 expands the
# taxonomy while the other ranks wait for it; rank r decides the slots with j % world == r; rank 0 then waits for
# all of slots 0..n-1, adds slots n, n+1, ... for the prompts rejected or duplicated until n remain, and writes
# prompts.jsonl (read by `synth.py --prompts`) and stats.json.


@dataclass(frozen=True)
class SubClass:
    """A sub-class of the paper's taxonomy (section 3.2 and its appendix template)."""

    category: str  # the slug prompts/l2p_taxonomy.jsonl uses, "major/sub"
    major: str
    name: str
    requirement: str = ""  # what the template asks of this sub-class's prompts
    quoted_text: bool = False  # its prompts render text, which the rules put in double quotes


# The appendix template's 4 major classes and 20 sub-classes (the text says 17). Fig. 2 calls "Synthetic" "Text".
TAXONOMY = (
    SubClass("nature/objects", "Nature", "Objects"),
    SubClass("nature/cityscape", "Nature", "Cityscape"),
    SubClass("nature/food", "Nature", "Food"),
    SubClass("nature/plants", "Nature", "Plants"),
    SubClass("nature/indoor", "Nature", "Indoor"),
    SubClass("nature/landscape", "Nature", "Landscape"),
    SubClass("nature/animals", "Nature", "Animals"),
    SubClass("design/arts", "Design", "Arts"),
    SubClass("design/posters", "Design", "Posters", "include the poster's text, in double quotes", True),
    SubClass("design/slides", "Design", "Slides", "include the slide's title, in double quotes", True),
    SubClass("design/cartoon", "Design", "Cartoon"),
    SubClass("design/ui", "Design", "UI", "show buttons and other interface elements, their labels in double quotes"),
    SubClass("design/others", "Design", "Others"),
    SubClass("people/portrait", "People", "Portrait"),
    SubClass("people/sports", "People", "Sports"),
    SubClass("people/activities", "People", "Activities"),
    SubClass("people/others", "People", "Others"),
    SubClass("text/chinese", "Synthetic", "Chinese Text", "render Chinese text, in double quotes", True),
    SubClass("text/english", "Synthetic", "English Text", "render English text, in double quotes", True),
    SubClass("text/others", "Synthetic", "Others", "render numbers, code or formulas, in double quotes", True),
)
VARIANTS = ("Simple", "Detailed")  # the paper's two prompt variants
# The template's diversity checklist. Each prompt is asked for one of each, drawn by its slot's seed: prompts
# written independently still spread over them, as the checklist asks of one long list.
VIEWPOINTS = ("low angle", "bird's-eye view", "Dutch angle", "macro close-up", "wide shot")
LIGHTING = ("golden hour", "blue hour", "cinematic lighting", "volumetric fog", "harsh sun", "softbox light")
STYLES = ("photorealistic", "cinematic", "analog film such as Kodak Portra", "digital art", "minimalist")
OPENINGS = ("the main subject", "the setting", "the light", "the style or medium", "an action or a moment")
BANNED_OPENINGS = ("a photo of", "an image of", "a picture of", "this image")  # the anti-repetition rule
PROMPT_CHARS = (50, 800)  # outside, a fragment or an essay; the paper's prompts concentrate at 200-350
QUOTED = re.compile(r'"[^"]+"|“[^”]+”')
AUDIT_CRITERIA = ("format", "quoted_text", "safety", "copyright")  # the auditor's criteria (paper Fig. 11)
# Reply lengths in tokens; a reply cut there is malformed JSON. A fine category takes under 16 (words, quotes).
WRITE_TOKENS, AUDIT_TOKENS, EXPAND_TOKENS_PER_CATEGORY = 384, 64, 16
PAPER_PROMPTS = 10_000
PAPER_FINE_CATEGORIES = 52  # x 20 sub-classes: the paper's "over 1,000 fine-grained categories"
MAX_SLOTS_PER_PROMPT = 2  # at most n more slots replace the rejected prompts of slots 0..n-1
PROMPTS_FILE, STATS_FILE = "prompts.jsonl", "stats.json"
WAIT_SECONDS = 1.0  # how often a rank looks for the files another rank makes

# Our own wording of the paper's templates (Figs. 10 and 11). Each request's fields come as JSON in the user turn.
EXPANDER_SYSTEM = """\
You plan the categories of a diverse text-to-image dataset. Given a major class and a sub-class, list `count` \
fine-grained categories inside it: concrete kinds of subjects or scenes that look clearly different from one \
another, each a short noun phrase of two to six words. No brands, real people or copyrighted characters.
Answer with one JSON object and nothing else: {"categories": ["...", "..."]}"""

WRITER_SYSTEM = """\
You write prompts for a text-to-image model. The user gives the category, the subject and the variant of one \
prompt, and a viewpoint, a lighting and a style to use when they suit the subject.
Rules:
- Fluent, natural English sentences that describe one picture; never a list of comma-separated tags.
- "Simple": one or two sentences. "Detailed": three to five sentences on the subject, the setting, the \
composition, the light and the style. Most prompts are 200 to 350 characters long.
- Every piece of text that should appear in the image goes in double quotes (escaped as \\" in JSON).
- Begin with what "open_with" names. Never begin with "A photo of", "An image of" or "This image".
- Nothing sexual, violent, hateful or politically sensitive; no brands, logos, trademarks, real people or \
copyrighted characters.
- Follow "requirement" when there is one. When "previous_attempt_rejected_for" is given, avoid that fault.
Answer with one JSON object and nothing else: {"prompt": "..."}"""

AUDITOR_SYSTEM = """\
You are the QA auditor of a text-to-image prompt dataset. Check the prompt against these criteria, in order:
format: complete, fluent sentences that describe one picture, not a list of tags, and it fits its category.
quoted_text: text that should appear in the image is in double quotes, and the requirement is met.
safety: no nudity, sexual content, violence, gore, hate, or politically sensitive content.
copyright: no trademarks, brands, logos, copyrighted characters or real public figures.
Answer with one JSON object and nothing else: {"is_valid": true, "reason": "ok"} when every criterion holds, \
else {"is_valid": false, "reason": "<the first failing criterion: format, quoted_text, safety or copyright>"}"""


@dataclass(frozen=True)
class PromptSettings:
    """What decides the prompts: a resumed run must use the same (batch size and world size may change)."""

    seed: int = 0
    fine_categories: int = PAPER_FINE_CATEGORIES
    attempts: int = 4  # per slot; each malformed, broken or rejected prompt costs one
    temperature: float = 0.7  # Qwen3's recommended sampling without thinking (its model card)
    top_p: float = 0.8


def recipe_sha256() -> str:
    """One hash for the templates and rules: prompts made under others must not be mixed in on resume."""
    recipe = (EXPANDER_SYSTEM, WRITER_SYSTEM, AUDITOR_SYSTEM, TAXONOMY, VARIANTS, VIEWPOINTS, LIGHTING, STYLES,
              OPENINGS, BANNED_OPENINGS, PROMPT_CHARS, AUDIT_CRITERIA, WRITE_TOKENS, AUDIT_TOKENS,
              EXPAND_TOKENS_PER_CATEGORY)
    return hashlib.sha256(repr(recipe).encode()).hexdigest()


def request_seed(seed: int, *key) -> int:
    """A request's own generator seed, from the corpus seed and what the request is (stable across processes,
    unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr((seed, *key)).encode()).digest()[:8], "little") >> 1


def read_json_reply(text: str, fields: dict[str, type]) -> dict | None:
    """The JSON object in a model's reply when it has `fields` with these types, else None (malformed). Words or
    a markdown fence around the object are tolerated: small models add them despite the instructions."""
    start, end = text.find("{"), text.rfind("}")
    try:
        reply = json.loads(text[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        return None
    if not isinstance(reply, dict) or any(not isinstance(reply.get(k), t) for k, t in fields.items()):
        return None
    return reply


def normalized(text: str) -> str:
    """What two prompts must share to be duplicates: their words, lower-cased, without punctuation."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def expand_subclass(sub: SubClass, settings: PromptSettings) -> Generator[ChatRequest, str, dict]:
    """Stage 1: the sub-class's fine-grained categories. When every attempt is malformed, the sub-class itself
    is its only category (counted in stats.json): the run goes on."""
    sampling = Sampling(EXPAND_TOKENS_PER_CATEGORY * (settings.fine_categories + 2),  # + the JSON around them
                        settings.temperature, settings.top_p)
    user = json.dumps({"major_class": sub.major, "sub_class": sub.name, "count": settings.fine_categories})
    for attempt in range(settings.attempts):
        reply = yield ChatRequest(EXPANDER_SYSTEM, user, request_seed(settings.seed, "expand", sub.category, attempt),
                                  sampling)
        listed = (read_json_reply(reply, {"categories": list}) or {}).get("categories", [])
        distinct = {}  # normalised name -> its first spelling
        for name in listed:
            if isinstance(name, str) and normalized(name):
                distinct.setdefault(normalized(name), name.strip())
        fine = list(distinct.values())[: settings.fine_categories]
        if fine:
            return {"category": sub.category, "fine_categories": fine, "malformed": attempt}
    return {"category": sub.category, "fine_categories": [sub.name], "malformed": settings.attempts}


@dataclass(frozen=True)
class SlotPlan:
    """What slot j asks for."""

    slot: int
    sub: SubClass
    subject: str  # its fine-grained category
    variant: str
    viewpoint: str
    lighting: str
    style: str
    open_with: str


def plan_slot(slot: int, fine: dict[str, list[str]], seed: int) -> SlotPlan:
    """Sub-classes in turn; within one, its fine categories in turn, each Simple then Detailed; the checklist
    drawn from the slot's own seed."""
    sub = TAXONOMY[slot % len(TAXONOMY)]
    turn = slot // len(TAXONOMY)  # how many slots of this sub-class come before
    subjects = fine[sub.category]
    draw = random.Random(request_seed(seed, "plan", slot))
    return SlotPlan(slot, sub, subjects[turn // len(VARIANTS) % len(subjects)], VARIANTS[turn % len(VARIANTS)],
                    draw.choice(VIEWPOINTS), draw.choice(LIGHTING), draw.choice(STYLES), draw.choice(OPENINGS))


def rule_failure(prompt: str, sub: SubClass) -> str | None:
    """The rules a program checks exactly, before the auditor reads the prompt: length, opening, quoted text."""
    if len(prompt) < PROMPT_CHARS[0]:
        return "too_short"
    if len(prompt) > PROMPT_CHARS[1]:
        return "too_long"
    if prompt.lower().startswith(BANNED_OPENINGS):
        return "repetitive_opening"
    if sub.quoted_text and not QUOTED.search(prompt):
        return "missing_quoted_text"
    return None


def audit_reason(reason: str) -> str:
    """The auditor's reason as one of its criteria, for counting ("audit_other" when it names none)."""
    said = reason.lower().replace(" ", "_")
    return "audit_" + next((c for c in AUDIT_CRITERIA if c in said), "other")


def write_slot(plan: SlotPlan, settings: PromptSettings) -> Generator[ChatRequest, str, dict]:
    """Stages 2 and 3 for one slot: write, check the rules, audit; each failure costs an attempt, and the next
    attempt is told its reason. The slot keeps the first prompt that passes, or none."""
    writing = Sampling(WRITE_TOKENS, settings.temperature, settings.top_p)
    auditing = Sampling(AUDIT_TOKENS)  # greedy: the same prompt always gets the same verdict
    fields = {"major_class": plan.sub.major, "sub_class": plan.sub.name, "subject": plan.subject,
              "variant": plan.variant, "viewpoint": plan.viewpoint, "lighting": plan.lighting, "style": plan.style,
              "open_with": plan.open_with} | ({"requirement": plan.sub.requirement} if plan.sub.requirement else {})
    category = f"{plan.sub.major} / {plan.sub.name}: {plan.subject}"
    rejects = []
    decided = {"slot": plan.slot, "category": plan.sub.category, "sub_category": plan.subject,
               "variant": plan.variant, "prompt": None, "rejects": rejects}
    for attempt in range(settings.attempts):
        retry = {"previous_attempt_rejected_for": rejects[-1]["reason"]} if rejects else {}
        reply = yield ChatRequest(WRITER_SYSTEM, json.dumps(fields | retry, ensure_ascii=False),
                                  request_seed(settings.seed, "write", plan.slot, attempt), writing)
        record = read_json_reply(reply, {"prompt": str})
        prompt = record["prompt"].strip() if record else ""
        reason = "malformed_json" if record is None else rule_failure(prompt, plan.sub)
        if reason is None:
            audit = {"category": category, "requirement": plan.sub.requirement, "prompt": prompt}
            judged = yield ChatRequest(AUDITOR_SYSTEM, json.dumps(audit, ensure_ascii=False),
                                       request_seed(settings.seed, "audit", plan.slot, attempt), auditing)
            verdict = read_json_reply(judged, {"is_valid": bool, "reason": str})
            if verdict is not None and verdict["is_valid"]:
                return decided | {"prompt": prompt}
            reason = "malformed_audit" if verdict is None else audit_reason(verdict["reason"])
        rejects.append({"reason": reason, "reply": reply})
    return decided


def run_tasks(lm, tasks: list[tuple[Path, Generator]], batch_size: int, what: str, tag: str) -> None:
    """Drive tasks (generators that yield requests and receive the replies) through `lm`, at most batch_size
    requests per call: a finished task's place goes to the next one, so batches stay full though tasks take
    different numbers of turns. A task's result is written to its file, atomically, as soon as it is decided."""
    queue, active = iter(tasks), {}  # path -> (task, the request it waits on)
    done, start = 0, time.time()
    while True:
        while len(active) < batch_size and (item := next(queue, None)) is not None:
            active[item[0]] = (item[1], next(item[1]))
        if not active:
            return
        replies = lm.generate([request for _, request in active.values()])
        for (path, (task, _)), reply in zip(list(active.items()), replies):
            try:
                active[path] = (task, task.send(reply))
            except StopIteration as result:
                del active[path]
                runtime.write_text_atomic(path, json.dumps(result.value, ensure_ascii=False))
                done += 1
        rate = done / (time.time() - start)
        eta = f"ETA {(len(tasks) - done) / rate / 60:.1f} min" if done else "ETA -"
        print(f"{tag}{done}/{len(tasks)} {what}  {rate * 60:.1f}/min  {eta}", file=sys.stderr)


def category_path(out: Path, sub: SubClass) -> Path:
    return out / "categories" / f"{sub.category.replace('/', '-')}.json"


def slot_path(out: Path, slot: int) -> Path:
    return out / "slots" / f"{slot:06d}.json"


def expand_taxonomy(lm, out: Path, settings: PromptSettings, batch_size: int, tag: str) -> None:
    todo = [(category_path(out, sub), expand_subclass(sub, settings)) for sub in TAXONOMY
            if not category_path(out, sub).exists()]
    run_tasks(lm, todo, batch_size, "sub-classes expanded", tag)


def fine_categories(out: Path) -> dict[str, list[str]]:
    return {sub.category: json.loads(category_path(out, sub).read_text())["fine_categories"] for sub in TAXONOMY}


def wait_for(paths: list[Path], what: str, tag: str) -> None:
    """Wait until another rank has made these files. Under torchrun a failed rank stops them all, so no rank
    waits on a dead one."""
    if not all(p.exists() for p in paths):
        print(f"{tag}waiting for the {what} of other ranks", file=sys.stderr)
    while not all(p.exists() for p in paths):
        time.sleep(WAIT_SECONDS)


def fill_slots(lm, out: Path, slots, fine: dict[str, list[str]], settings: PromptSettings, batch_size: int,
               tag: str) -> None:
    todo = [(slot_path(out, j), write_slot(plan_slot(j, fine, settings.seed), settings)) for j in slots
            if not slot_path(out, j).exists()]
    run_tasks(lm, todo, batch_size, "prompts decided", tag)


def assemble(out: Path, slots: int, n: int) -> tuple[list[dict], dict]:
    """The first n distinct kept prompts of slots 0..slots-1, in slot order, and the counts of stats.json."""
    records, seen, reasons, used = [], set(), Counter(), 0
    by_category = {sub.category: {"kept": 0, "rejected": 0} for sub in TAXONOMY}
    for j in range(slots):
        if len(records) == n:
            break
        used = j + 1
        slot = json.loads(slot_path(out, j).read_text())
        counts = by_category[slot["category"]]
        reasons.update(r["reason"] for r in slot["rejects"])
        counts["rejected"] += len(slot["rejects"])
        if slot["prompt"] is not None and normalized(slot["prompt"]) in seen:
            reasons["duplicate"] += 1
            counts["rejected"] += 1
        elif slot["prompt"] is not None:
            seen.add(normalized(slot["prompt"]))
            records.append({k: slot[k] for k in ("prompt", "category", "sub_category", "variant")})
            counts["kept"] += 1
    return records, {"prompts": len(records), "slots": used, "by_category": by_category,
                     "rejects": dict(sorted(reasons.items()))}


def finish_corpus(lm, out: Path, n: int, fine: dict[str, list[str]], settings: PromptSettings, batch_size: int,
                  tag: str) -> Path:
    """Add slots for the prompts rejected or duplicated until n remain (or MAX_SLOTS_PER_PROMPT * n slots were
    used), then write prompts.jsonl and stats.json."""
    end = n
    records, stats = assemble(out, end, n)
    while len(records) < n and end < MAX_SLOTS_PER_PROMPT * n:
        extra = range(end, min(end + n - len(records), MAX_SLOTS_PER_PROMPT * n))
        fill_slots(lm, out, extra, fine, settings, batch_size, tag)
        end = extra.stop
        records, stats = assemble(out, end, n)
    expanded = [json.loads(category_path(out, sub).read_text()) for sub in TAXONOMY]
    stats |= {"asked": n, "fine_categories": sum(len(e["fine_categories"]) for e in expanded),
              "malformed_expansions": {e["category"]: e["malformed"] for e in expanded if e["malformed"]}}
    runtime.write_text_atomic(out / PROMPTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    runtime.write_text_atomic(out / STATS_FILE, json.dumps(stats, indent=2) + "\n")
    rejected = ", ".join(f"{reason} {count}" for reason, count in stats["rejects"].items()) or "none"
    print(f"{tag}wrote {len(records)} prompts to {out / PROMPTS_FILE} ({stats['slots']} slots; rejected: {rejected}; "
          f"per category in {out / STATS_FILE})", file=sys.stderr)
    if len(records) < n:
        print(f"{tag}only {len(records)} of the {n} prompts asked for passed: see the rejects in {out / 'slots'}",
              file=sys.stderr)
    return out / PROMPTS_FILE


def make_prompts(lm, out: Path, n: int, settings: PromptSettings, batch_size: int, rank: int, world: int) -> Path:
    """Stage 1 on rank 0 (20 requests), this rank's share of slots 0..n-1, and on rank 0 the rest."""
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    if rank == 0:
        expand_taxonomy(lm, out, settings, batch_size, tag)
    wait_for([category_path(out, sub) for sub in TAXONOMY], "expanded sub-classes", tag)
    fine = fine_categories(out)
    fill_slots(lm, out, range(rank, n, world), fine, settings, batch_size, tag)
    if rank != 0:
        print(f"{tag}my share is done; rank 0 writes {out / PROMPTS_FILE}", file=sys.stderr)
        return out / PROMPTS_FILE
    wait_for([slot_path(out, j) for j in range(n)], "slots", tag)
    return finish_corpus(lm, out, n, fine, settings, batch_size, tag)


def parse_prompt_args(argv=None):
    p = argparse.ArgumentParser(
        prog="synth.py prompts", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write the corpus's prompts with the source's own text encoder run as a chat model (paper "
                    "section 3.2: taxonomy -> fine-grained categories -> prompts -> audit -> de-duplication).\n\n"
                    "    python synth.py prompts --ckpt Tongyi-MAI/Z-Image-Turbo --n 10000 --out prompts-zimage\n"
                    "    python synth.py --ckpt Tongyi-MAI/Z-Image-Turbo --prompts prompts-zimage/prompts.jsonl\n\n"
                    "Resumable (rerun the same command), and sharded over ranks under torchrun.")
    p.add_argument("--ckpt", default="Tongyi-MAI/Z-Image-Turbo",
                   help="Z-Image pipeline (hub id or diffusers folder) whose text_encoder and tokenizer write")
    p.add_argument("--out", type=Path, default=Path("prompts-zimage"),
                   help=f"folder: {PROMPTS_FILE}, {STATS_FILE}, and the per-slot and per-category results")
    p.add_argument("--n", type=positive_int, default=PAPER_PROMPTS,
                   help=f"prompts to keep (default: the paper's {PAPER_PROMPTS})")
    p.add_argument("--fine-categories", type=positive_int, default=PAPER_FINE_CATEGORIES,
                   help=f"fine-grained categories asked per sub-class (default {PAPER_FINE_CATEGORIES}: over "
                        "1,000 for the 20 sub-classes, as the paper)")
    p.add_argument("--attempts", type=positive_int, default=PromptSettings.attempts,
                   help="tries per prompt: each malformed reply, broken rule or audit rejection costs one "
                        f"(default {PromptSettings.attempts})")
    p.add_argument("--temperature", type=non_negative_float, default=PromptSettings.temperature,
                   help=f"sampling temperature of the writer (default {PromptSettings.temperature}; 0: greedy); "
                        "the auditor is always greedy")
    p.add_argument("--top-p", type=positive_float, default=PromptSettings.top_p,
                   help=f"nucleus sampling, in (0, 1] (default {PromptSettings.top_p})")
    p.add_argument("--seed", type=int, default=PromptSettings.seed, help="decides every draw of the corpus")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="requests per generation batch on each rank (default 64; KV cache ~ 0.15 MB per token per "
                        "request for Qwen3-4B in bf16)")
    p.add_argument("--device", default="auto", help="auto (CUDA device LOCAL_RANK when present), cpu, cuda:N")
    p.add_argument("--dtype", default="auto", choices=runtime.DTYPE_CHOICES,
                   help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")
    args = p.parse_args(argv)
    if args.top_p > 1:
        raise ValueError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    return args


def chat_folders(ckpt: str) -> tuple[Path, Path]:
    """The text_encoder and tokenizer folders of a Z-Image pipeline: the only sources whose text encoder is a
    chat model."""
    root = hub.resolve(ckpt, hub.pipeline_patterns(("text",)))
    index = hub.read_pipeline_index(root)
    if index["_class_name"] != "ZImagePipeline":
        raise ValueError(f"--ckpt {ckpt}: a {index['_class_name']}, whose text encoders cannot write; prompts are "
                         "written by a ZImagePipeline's text encoder (Qwen3)")
    (encoder, tokenizer), = hub.text_folders(root, index)
    return encoder, tokenizer


def write_prompts(argv=None, lm=None) -> Path:
    """`synth.py prompts`. `lm` replaces the source's chat model: anything with `generate(requests) -> texts`."""
    args = parse_prompt_args(argv)
    rank, world = rank_and_world()
    settings = PromptSettings(args.seed, args.fine_categories, args.attempts, args.temperature, args.top_p)
    recorded = {"source": args.ckpt, "recipe_sha256": recipe_sha256()} | asdict(settings)
    if lm is None:
        device, dtype = runtime.pick_device_dtype(args.device, args.dtype)
        encoder, tokenizer = chat_folders(args.ckpt)
        recorded["text_sha256"] = hub.text_sha256(args.ckpt)
    out = runtime.writable_folder(args.out)
    with runtime.folder_lock(out) if rank == 0 else nullcontext():
        check_settings(out, recorded)
        if lm is None:
            lm = Qwen3Chat(hub.load_qwen3_lm(encoder, dtype, device), hub.load_tokenizer(tokenizer).tokenizer)
        return make_prompts(lm, out, args.n, settings, args.batch_size, rank, world)


def main(argv=None):
    """`synth.py prompts ...` writes prompts; `synth.py ...` makes images."""
    argv = sys.argv[1:] if argv is None else argv
    return write_prompts(argv[1:]) if argv[:1] == ["prompts"] else synthesize(argv)


if __name__ == "__main__":
    runtime.run_cli(main)
