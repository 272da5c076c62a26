"""SD3 / SD3.5 and FLUX.1 latent sources against diffusers' StableDiffusion3Pipeline and FluxPipeline: the whole
image from the same tiny folders, prompt and initial latents; the schedules against the golden
values; the CLIs on tiny folders; and the errors of a pipeline we cannot read."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hub
import runtime
import sample
import synth
from fixtures import FLUX_SCHEDULERS, SD3_SCHEDULER, tiny_flux_pipeline, tiny_sd3_pipeline

PROMPT = "a red circle above a blue square"
HEIGHT, WIDTH = 32, 48  # the tiny VAE downsamples 2x: latents 16 x 24, a token grid of 8 x 12
STEPS = 4
# name -> (builder, our guidance, diffusers' guidance_scale): SD3's CFG scale is ours as is; FLUX-dev's goes into its
# guidance embedding; schnell has neither (diffusers' docs: guidance_scale 0), which is our guidance 1
CASES = {
    "sd3": (lambda folder: tiny_sd3_pipeline(folder, t5=True), 4.5, 4.5),
    "sd3-without-t5": (lambda folder: tiny_sd3_pipeline(folder, t5=False), 4.5, 4.5),
    "flux-schnell": (lambda folder: tiny_flux_pipeline(folder, guidance=False), 1.0, 0.0),
    "flux-dev": (lambda folder: tiny_flux_pipeline(folder, guidance=True), 3.5, 3.5),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name) for name, (build, _, _) in CASES.items()}


def reference_image(folder: Path, name: str, latents: torch.Tensor, guidance_scale: float) -> np.ndarray:
    """diffusers' pipeline on our (B, 16, H/2, W/2) latents; FluxPipeline takes them packed, (B, H/4 * W/4, 64),
    and a T5 length (512 by default; BFL and diffusers' docs use 256 for schnell)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                  output_type="np")
    if name.startswith("sd3"):
        # diffusers loads a folder whose T5 is [null, null] only when told so, as one drops T5 from a hub repo
        no_t5 = dict(text_encoder_3=None, tokenizer_3=None) if name == "sd3-without-t5" else {}
        ref = StableDiffusion3Pipeline.from_pretrained(folder, **no_t5)
        return ref(PROMPT, latents=latents.clone(), **common).images[0]
    B, C, H, W = latents.shape
    return FluxPipeline.from_pretrained(folder)(PROMPT, latents=FluxPipeline._pack_latents(latents, B, C, H, W),
                                                max_sequence_length=256 if name == "flux-schnell" else 512,
                                                **common).images[0]


@pytest.mark.parametrize("name", CASES)
def test_whole_image_matches_diffusers(folders, name):
    """4 steps, same folder, prompt and initial latents: max |diff| < 1e-3 on the 0..1 image."""
    _, guidance, guidance_scale = CASES[name]
    latents = torch.randn(1, 16, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(3))
    expected = reference_image(folders[name], name, latents, guidance_scale)
    pipe = hub.load_pipeline(str(folders[name]))
    got = sample.sample_latent(pipe, [PROMPT], [0], HEIGHT, WIDTH, STEPS, guidance, latents=latents.clone())
    got = got[0].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).max() < 1e-3
    assert ((expected > 0.01) & (expected < 0.99)).mean() > 0.5, "a saturated image would compare trivially"
    # the comparison is sensitive: another guidance (CFG off; FLUX-dev's embedding at 1) or prompt changes the image
    other = (sample.sample_latent(pipe, ["three green triangles"], [0], HEIGHT, WIDTH, STEPS, guidance,
                                  latents=latents.clone()) if name == "flux-schnell" else
             sample.sample_latent(pipe, [PROMPT], [0], HEIGHT, WIDTH, STEPS, 1.0, latents=latents.clone()))
    assert np.abs(other[0].permute(1, 2, 0).numpy() - expected).max() > 1e-2


def test_text_sides_follow_the_pipeline(folders):
    """SD3 without T5 reads no text_encoder_3; FLUX's T5 length is 512 for dev, 256 for schnell."""
    assert hub.load_pipeline(str(folders["sd3-without-t5"]), parts=("text",)).text.t5 is None
    assert hub.load_pipeline(str(folders["sd3"]), parts=("text",)).text.t5 is not None
    assert hub.load_pipeline(str(folders["flux-dev"]), parts=("text",)).text.t5_tokens == 512
    assert hub.load_pipeline(str(folders["flux-schnell"]), parts=("text",)).text.t5_tokens == 256


def test_each_part_fetches_only_its_folders(folders):
    """The allow-patterns of a part match every file it reads, and nothing of the other parts."""
    from huggingface_hub.utils import filter_repo_objects

    root = folders["sd3"]
    files = [str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()]
    fetched = {part: set(filter_repo_objects(files, allow_patterns=hub.pipeline_patterns((part,))))
               for part in hub.ALL_PARTS}
    configs = {"model_index.json", "scheduler/scheduler_config.json", "transformer/config.json"}
    assert {f.split("/")[0] for f in fetched["text"] - configs} == {
        "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"}
    assert {f.split("/")[0] for f in fetched["vae"] - configs} == {"vae"}
    assert fetched["transformer"] - configs == {"transformer/diffusion_pytorch_model.safetensors"}
    assert set().union(*fetched.values()) == set(files)


# ----------------------------------------------------------------------------------------------------
# Schedules: docs/formats.md, "Schedulers" (diffusers 0.42.1), and diffusers itself


@pytest.mark.parametrize("scheduler,seq_len,sd3,golden", [
    (SD3_SCHEDULER, 4096, True, [1.0, 0.857692, 0.602151, 0.008929, 0.0]),  # last sigma shifted twice
    (FLUX_SCHEDULERS["schnell"], 4096, False, [1.0, 0.75, 0.5, 0.25, 0.0]),
    (FLUX_SCHEDULERS["dev"], 4096, False, [1.0, 0.904531, 0.759511, 0.512844, 0.0]),  # 1024^2: mu 1.15
    (FLUX_SCHEDULERS["dev"], 1024, False, [1.0, 0.849235, 0.652489, 0.384945, 0.0]),  # 512^2: mu 0.63
])
def test_golden_sigmas(scheduler, seq_len, sd3, golden):
    sigmas = sample.source_sigmas(4, scheduler, seq_len, from_training_table=sd3)
    assert torch.allclose(sigmas, torch.tensor(golden), rtol=0, atol=1e-6)


def test_sd3_golden_timesteps_at_28_steps():
    timesteps = sample.source_sigmas(28, SD3_SCHEDULER, 4096, from_training_table=True)[:-1] * 1000
    assert torch.allclose(timesteps[:3], torch.tensor([1000.0, 987.3806, 974.1077]), rtol=0, atol=1e-3)
    assert torch.allclose(timesteps[-2:], torch.tensor([110.9057, 8.9286]), rtol=0, atol=1e-3)


@pytest.mark.parametrize("scheduler", [SD3_SCHEDULER, dict(shift=1.0), dict(use_dynamic_shifting=True)])
@pytest.mark.parametrize("steps", [1, 7, 40])
def test_sd3_schedule_matches_diffusers(scheduler, steps):
    """set_timesteps(N) without sigmas, as StableDiffusion3Pipeline calls it (with mu when the shift is dynamic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    seq_len = 1024
    ref = FlowMatchEulerDiscreteScheduler(**scheduler)
    ref.set_timesteps(steps, mu=calculate_shift(seq_len) if scheduler.get("use_dynamic_shifting") else None)
    assert torch.allclose(sample.source_sigmas(steps, scheduler, seq_len, from_training_table=True), ref.sigmas,
                          rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# The CLIs on tiny folders


def test_sample_cli_on_sd3_writes_a_png(folders, tmp_path):
    out = tmp_path / "x.png"
    written = sample.main(["--ckpt", str(folders["sd3"]), "--prompt", PROMPT, "--h", "32", "--w", "32", "--steps", "2",
                           "--out", str(out), "--device", "cpu", "--dtype", "fp32"])
    assert written == [out]
    image = Image.open(out)
    settings = json.loads(image.info["l2p"])
    assert image.size == (32, 32) and settings["steps"] == 2
    assert settings["guidance"] == hub.SOURCE_DEFAULTS["sd3"]["guidance"]


def test_synth_cli_on_flux_dev(folders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    out = synth.synthesize(["--ckpt", str(folders["flux-dev"]), "--prompts", str(prompts), "--out", str(tmp_path / "d"),
                            "--h", "32", "--w", "48", "--steps", "2", "--images-per-prompt", "1",
                            "--device", "cpu", "--dtype", "fp32"])
    row = json.loads((out / runtime.CORPUS_METADATA).read_text())
    assert row["guidance"] == hub.SOURCE_DEFAULTS["flux-dev"]["guidance"] and row["shift"] == "dynamic"
    assert Image.open(out / row["file"]).size == (48, 32)


# ----------------------------------------------------------------------------------------------------
# Bad input


def rewrite_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_unsupported_pipeline_class_names_the_supported_ones(folders, tmp_path):
    copy = tmp_path / "pipe"
    shutil.copytree(folders["flux-schnell"], copy)
    rewrite_json(copy / "model_index.json", _class_name="StableDiffusionXLPipeline")
    with pytest.raises(hub.CheckpointError, match=r"'StableDiffusionXLPipeline' is not supported \(supported: "
                                                  r"ZImagePipeline, StableDiffusion3Pipeline, FluxPipeline\)"):
        hub.load_pipeline(str(copy))


def test_inconsistent_pipelines_fail_before_weights_are_read(folders, tmp_path):
    copy = tmp_path / "pipe"
    shutil.copytree(folders["sd3"], copy)
    rewrite_json(copy / "model_index.json", _class_name="FluxPipeline")
    with pytest.raises(hub.CheckpointError, match=r"transformer/config.json: _class_name 'SD3Transformer2DModel', "
                                                  r"expected FluxTransformer2DModel"):
        hub.load_pipeline(str(copy), parts=("transformer",))
    rewrite_json(copy / "model_index.json", _class_name="StableDiffusion3Pipeline", tokenizer_3=[None, None])
    with pytest.raises(hub.CheckpointError, match="tokenizer_3 is null but its partner is not"):
        hub.load_pipeline(str(copy))
    with pytest.raises(ValueError, match="--h 30 is not a positive multiple of 4"):
        sample.main(["--ckpt", str(folders["sd3"]), "--prompt", "x", "--h", "30", "--w", "32",
                     "--out", str(tmp_path / "x.png")])
