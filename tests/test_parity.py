"""Our plain-PyTorch source model against the reference implementations, in float32 on tiny random weights."""

import numpy as np
import pytest
import torch

import hub
import sample
from tokenizer import PromptTokenizer, encode_prompts

PROMPTS = ["a red circle above a blue square", "A poster with the text \"HELLO WORLD\", two cats and a dog."]


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def reference_dit(ref, x, t_native, captions):
    """diffusers' Z-Image takes a list of (C, F=1, H, W) latents and its native time (1 = clean)."""
    out = ref(list(x.unsqueeze(2).unbind(0)), t_native, captions, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@pytest.mark.parametrize("t_native", [(0.25, 0.875), (1.0, 0.5), (0.125, 0.0)])
@pytest.mark.parametrize("grid", [(8, 12), (7, 10)])
def test_dit_matches_diffusers(pipeline_dir, t_native, grid):
    """Two captions whose padded lengths differ (7 -> 32, 45 -> 64), non-square token grids; 7 x 10 = 70
    image tokens also need the learned image pad token (-> 96)."""
    from diffusers import ZImageTransformer2DModel

    ref = ZImageTransformer2DModel.from_pretrained(pipeline_dir / "transformer").eval()
    ours = hub.load_zimage_transformer(pipeline_dir / "transformer", torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 2 * grid[0], 2 * grid[1], generator=g)
    captions = [torch.randn(7, 32, generator=g), torch.randn(45, 32, generator=g)]
    t = torch.tensor(t_native)  # dyadic values, so 1 - (1 - t) == t exactly
    with torch.no_grad():
        expected = -reference_dit(ref, x, t, captions)  # our convention: velocity noise - x0
        got = ours(x, 1 - t, captions)
    assert relative_error(got, expected) < 1e-5
    # each sample is independent of its batch neighbour, whatever the caption padding
    with torch.no_grad():
        alone = ours(x[1:], 1 - t[1:], captions[1:])
    assert relative_error(alone, expected[1:]) < 1e-5


def test_qwen3_encoder_matches_transformers(pipeline_dir):
    from transformers import Qwen3Model

    ref = Qwen3Model.from_pretrained(pipeline_dir / "text_encoder").eval()
    ours = hub.load_qwen3(pipeline_dir / "text_encoder", torch.float32, "cpu")
    ids, mask = PromptTokenizer.from_folder(pipeline_dir / "tokenizer")(PROMPTS)
    assert not mask.all(), "the two prompts must differ in length so the mask matters"
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        got = ours(ids, mask)
    assert relative_error(got[mask], expected[mask]) < 1e-5


def test_vae_matches_diffusers(pipeline_dir):
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(pipeline_dir / "vae").eval()
    ours = hub.load_vae(pipeline_dir / "vae", torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    latents = torch.randn(2, 16, 16, 24, generator=g)
    cfg = ref.config
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        mean, logvar = ours.encode_moments(images)
        assert relative_error(mean, posterior.mean) < 1e-5
        assert relative_error(logvar, posterior.logvar) < 1e-5
        assert relative_error(ours.encode(images), (posterior.mean - cfg.shift_factor) * cfg.scaling_factor) < 1e-5
        decoded = ref.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample
        assert relative_error(ours.decode(latents), decoded) < 1e-5


def test_tokenization_matches_transformers_chat_template(pipeline_dir):
    """Token ids of Z-Image's chat formatting equal transformers' Qwen3 chat template + tokenizer (max 512)."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    ours = PromptTokenizer.from_folder(pipeline_dir / "tokenizer")
    prompts = PROMPTS + ["Ünïcödé  spaces\n\nnew lines, <|im_end|> and 12345", "long " * 600]
    texts = [ref.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=True) for p in prompts]
    expected = ref(texts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    ids, mask = ours(prompts)
    assert int(mask.sum(1).max()) == 512, "the long prompt must be truncated at 512 tokens"
    for i in range(len(prompts)):
        assert ids[i][mask[i]].tolist() == expected.input_ids[i][expected.attention_mask[i].bool()].tolist()


@pytest.mark.parametrize("scheduler", [{"shift": 3.0, "use_dynamic_shifting": False},
                                       {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}])
@pytest.mark.parametrize("steps,seq_len", [(4, 96), (8, 4096), (30, 2500)])
def test_schedule_matches_diffusers(scheduler, steps, seq_len):
    """Sigmas as ZImagePipeline sets them: linspace(1, 1/N, N), shifted (or mu from the token count), then 0.
    Up to max_image_seq_len (4096): past it our mu is bounded on purpose (sample.resolution_mu, test_highres)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    ref = FlowMatchEulerDiscreteScheduler(**scheduler)
    ref.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=calculate_shift(seq_len))
    ours = sample.source_sigmas(steps, scheduler, seq_len)
    assert torch.allclose(ours, ref.sigmas, rtol=0, atol=1e-6)


def test_whole_image_matches_zimage_pipeline(pipeline_dir):
    """Same folder, prompt and initial latents, 4 steps with guidance: max |diff| < 1e-3 on the 0..1 image."""
    from diffusers import ZImagePipeline

    latents = torch.randn(1, 16, 16, 24, generator=torch.Generator().manual_seed(3))
    ref = ZImagePipeline.from_pretrained(pipeline_dir)
    expected = ref(PROMPTS[0], height=32, width=48, num_inference_steps=4, guidance_scale=1.5,
                   latents=latents.clone(), output_type="np").images[0]
    pipe = hub.load_pipeline(str(pipeline_dir))
    # diffusers' Z-Image guidance_scale g is our guidance 1 + g (see sample.guided_velocity)
    got = sample.sample_latent(pipe, PROMPTS[:1], [0], 32, 48, steps=4, guidance=2.5, latents=latents.clone())
    got = got[0].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).max() < 1e-3
    # the comparison is sensitive: no guidance gives a visibly different image
    unguided = sample.sample_latent(pipe, PROMPTS[:1], [0], 32, 48, steps=4, guidance=1.0, latents=latents.clone())
    assert np.abs(unguided[0].permute(1, 2, 0).numpy() - expected).max() > 1e-2


def test_encode_prompts_returns_valid_tokens_only(pipeline_dir):
    pipe = hub.load_pipeline(str(pipeline_dir), parts=("transformer", "text"))
    features = encode_prompts(pipe.text.encoder, pipe.text.tokenizer, PROMPTS)
    ids, mask = pipe.text.tokenizer(PROMPTS)
    assert [len(f) for f in features] == mask.sum(1).tolist()
