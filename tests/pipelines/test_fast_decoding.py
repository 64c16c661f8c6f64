"""Fast decoding: diffusers' flow schedulers in FlowMoPipeline, FlowMoModel.decode, and a sync-free, compilable
decoder. (Distillation to K passes is tested in tests/training/test_distillation.py.)"""

import diffusers
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from packaging.version import Version

from flowmo_diffusers import FlowMoModel, FlowMoPipeline, FlowMoScheduler, get_preset_config
from flowmo_diffusers.schedulers.scheduling_flowmo import in_guidance_interval

FLOW = dict(prediction_type="flow_prediction", use_flow_sigmas=True)


def guided_velocity(model, latents, t, code, guidance, interval=(0.17, 1.02)):
    """The decoder's velocity at flow time t with the paper's guidance rule, two separate passes (the reference)."""
    times = torch.full((len(latents),), float(t))
    velocity = model(latents, times, code).sample
    if guidance != 1.0 and in_guidance_interval(float(t), interval):
        null = model(latents, times, code, code_mask=torch.zeros(len(latents))).sample
        velocity = null + guidance * (velocity - null)
    return velocity


@torch.no_grad()
def test_flow_match_euler_on_flowmo_grid_equals_the_paper_sampler(tiny_pipeline):
    ids = torch.randint(0, 16, (2, 24), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    paper = tiny_pipeline(indices=ids, latents=noise, output_type="pt")
    assert paper.num_decoder_passes == 31  # 25 steps, 6 of them guided
    tiny_pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_pipeline.scheduler.config)
    euler = tiny_pipeline(indices=ids, latents=noise, output_type="pt")
    assert euler.num_decoder_passes == 31
    torch.testing.assert_close(euler.images, paper.images, rtol=0, atol=1e-6)


@torch.no_grad()
def test_heun_guides_each_evaluation_at_its_own_time(tiny_pipeline):
    """Heun's corrector evaluates at the next time: guidance is decided there, per evaluation."""
    model = tiny_pipeline.autoencoder
    ids = torch.randint(0, 16, (1, 24), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tiny_pipeline.scheduler = FlowMatchHeunDiscreteScheduler.from_config(tiny_pipeline.scheduler.config)
    steps = 6
    out = tiny_pipeline(indices=ids, latents=noise, num_inference_steps=steps, output_type="pt")

    grid = FlowMatchHeunDiscreteScheduler()
    grid.set_timesteps(steps)
    times = [float(t) for t in torch.unique_consecutive(grid.sigmas)]  # s_0 .. s_{N-1}, 0
    code = model.indices_to_code(ids)
    z, evaluations = noise.clone(), []
    for t, t_next in zip(times[:-1], times[1:]):
        v1 = guided_velocity(model, z, t, code, 1.5)
        evaluations.append(t)
        predicted = z + (t_next - t) * v1
        if t_next == 0:
            z = predicted
            continue
        v2 = guided_velocity(model, predicted, t_next, code, 1.5)
        evaluations.append(t_next)
        z = z + (t_next - t) * (v1 + v2) / 2
    expected_passes = sum(2 if in_guidance_interval(t, (0.17, 1.02)) else 1 for t in evaluations)
    assert len(evaluations) == 2 * steps - 1
    assert out.num_decoder_passes == expected_passes > len(evaluations)  # some evaluations were guided
    torch.testing.assert_close(out.images * 2 - 1, z.clamp(-1, 1), rtol=0, atol=2e-5)


# UniPC takes FlowMo's grid (t = (i/N)^4); DPM-Solver keeps its own linear flow grid.
@pytest.mark.parametrize("scheduler_class, grid", [(UniPCMultistepScheduler, "power"), (DPMSolverMultistepScheduler, "linear")])
@torch.no_grad()
def test_multistep_solvers_converge_faster_than_euler(tiny_pipeline, scheduler_class, grid):
    """Unguided, at 6 steps on the same grid, a second-order multistep solver lands closer to a 400-step Euler
    solution than Euler does."""
    ids = torch.randint(0, 16, (2, 24), generator=torch.Generator().manual_seed(4))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    kwargs = dict(indices=ids, latents=noise, guidance_scale=1.0, output_type="pt")
    tiny_pipeline.scheduler = FlowMoScheduler(time_schedule="linear")
    reference = tiny_pipeline(num_inference_steps=400, **kwargs).images
    tiny_pipeline.scheduler = FlowMoScheduler(time_schedule=grid)
    euler = tiny_pipeline(num_inference_steps=6, **kwargs).images
    tiny_pipeline.scheduler = scheduler_class.from_config(FlowMoScheduler().config, **FLOW)
    solver = tiny_pipeline(num_inference_steps=6, **kwargs)
    assert solver.num_decoder_passes == 6
    assert (solver.images - reference).abs().mean() < (euler - reference).abs().mean()


@pytest.mark.parametrize(
    "scheduler, message",
    [
        (DDPMScheduler(), "prediction_type='epsilon'"),
        (UniPCMultistepScheduler(), "prediction_type='flow_prediction'"),
        (DPMSolverMultistepScheduler(prediction_type="flow_prediction"), "use_flow_sigmas=True"),
        (EulerDiscreteScheduler(), "prediction_type='epsilon'"),
        (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "use_dynamic_shifting"),
    ],
)
def test_schedulers_that_cannot_drive_a_velocity_model_are_refused(tiny_pipeline, scheduler, message):
    tiny_pipeline.scheduler = scheduler
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(indices=torch.zeros(1, 24, dtype=torch.long), num_inference_steps=2)


def test_swapped_scheduler_survives_save_and_load(tiny_pipeline, tmp_path):
    tiny_pipeline.scheduler = UniPCMultistepScheduler.from_config(tiny_pipeline.scheduler.config, **FLOW)
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = FlowMoPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, UniPCMultistepScheduler) and loaded.scheduler.config.use_flow_sigmas
    loaded.set_progress_bar_config(disable=True)
    ids, noise = torch.randint(0, 16, (1, 24)), torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        loaded(indices=ids, latents=noise, num_inference_steps=3, output_type="pt").images,
        tiny_pipeline(indices=ids, latents=noise, num_inference_steps=3, output_type="pt").images,
        rtol=0,
        atol=1e-6,
    )


@torch.no_grad()
def test_model_decode_is_the_pipeline_path(tiny_pipeline):
    model = tiny_pipeline.autoencoder
    ids = torch.randint(0, 16, (2, 24))
    decoded = model.decode(ids, generator=torch.Generator().manual_seed(0))
    piped = tiny_pipeline(indices=ids, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert decoded.num_decoder_passes == piped.num_decoder_passes == 31
    torch.testing.assert_close(decoded.sample / 2 + 0.5, piped.images, rtol=0, atol=0)
    # A code decodes like its ids; unguided decoding takes one pass per step.
    from_code = model.decode(model.indices_to_code(ids), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_code.sample, decoded.sample, rtol=0, atol=0)
    assert model.decode(ids, num_inference_steps=4, guidance_scale=1.0).num_decoder_passes == 4


@torch.no_grad()
def test_decoder_sampling_defaults_come_from_the_model_config(tiny_model):
    """A K-pass student's config makes `pipe(indices=ids)` take K passes with no argument."""
    tiny_model.register_to_config(sampling_num_inference_steps=2, sampling_guidance_scale=1.0)
    pipe = FlowMoPipeline(autoencoder=tiny_model, scheduler=FlowMoScheduler(time_schedule="linear"))
    pipe.set_progress_bar_config(disable=True)
    ids, noise = torch.randint(0, 16, (1, 24)), torch.randn(1, 3, 32, 32)
    out = pipe(indices=ids, latents=noise, output_type="pt")
    assert out.num_decoder_passes == 2
    code = tiny_model.indices_to_code(ids)
    velocity = tiny_model(noise, torch.ones(1), code).sample
    half = noise - 0.5 * velocity
    expected = half - 0.5 * tiny_model(half, torch.full((1,), 0.5), code).sample
    torch.testing.assert_close(out.images * 2 - 1, expected.clamp(-1, 1), rtol=0, atol=1e-6)


def test_decode_never_reads_a_device_tensor_on_the_host():
    """On the meta device any host read (`.item()`, `bool(tensor)`, `nonzero`) raises: decoding must not need one,
    so on a GPU the sampling loop never waits for the device."""
    with torch.device("meta"):
        model = FlowMoModel(**get_preset_config("flowmo-tiny"))
    code = torch.zeros(2, 8, 12, device="meta")
    latents = torch.zeros(2, 3, 32, 32, device="meta")
    for scheduler in (None, FlowMatchEulerDiscreteScheduler(), FlowMatchHeunDiscreteScheduler()):
        out = model.decode(code, latents=latents, scheduler=scheduler, num_inference_steps=5)
        assert out.sample.device.type == "meta" and out.sample.shape == (2, 3, 32, 32)


# diffusers before 0.38 calls is_torch_version inside dispatch_attention_fn, which dynamo cannot trace: there the
# decoder compiles only with graph breaks, and fullgraph=True fails. setup.py's floor (0.36) runs without these two.
needs_diffusers_0_38 = pytest.mark.skipif(
    Version(diffusers.__version__) < Version("0.38.0"),
    reason="torch.compile(fullgraph=True) through diffusers' attention dispatch needs diffusers >= 0.38",
)


@needs_diffusers_0_38
def test_decoder_compiles_as_one_graph(tiny_model):
    import torch._dynamo

    torch._dynamo.reset()
    noise, code = torch.randn(2, 3, 32, 32), torch.randn(2, 8, 12).sign()
    rotary_emb = tiny_model.decoder_rotary_embedding(32, 32)
    times = torch.tensor([0.3, 0.9])
    expected = tiny_model(noise, times, code, rotary_emb=rotary_emb).sample
    explanation = torch._dynamo.explain(tiny_model)(noise, times, code, rotary_emb=rotary_emb)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(noise, times, code, rotary_emb=rotary_emb).sample, expected, rtol=1e-5, atol=1e-5)


@needs_diffusers_0_38
def test_compile_repeated_blocks(tiny_model):
    import torch._dynamo

    torch._dynamo.reset()
    noise, code = torch.randn(1, 3, 32, 32), torch.randn(1, 8, 12).sign()
    expected = tiny_model(noise, torch.tensor([0.5]), code).sample
    tiny_model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    compiled_blocks = [block for block in tiny_model.modules() if type(block).__name__ == "FlowMoBlock"]
    assert compiled_blocks and all(getattr(block, "_compiled_call_impl", None) is not None for block in compiled_blocks)
    torch.testing.assert_close(tiny_model(noise, torch.tensor([0.5]), code).sample, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    Version(torch.__version__.split("+")[0]) < Version("2.6.0"),
    reason="before torch 2.6, checkpoint recomputation forks the RNG of the meta device, which has none",
)
def test_training_steps_never_read_a_device_tensor_on_the_host():
    """Stage 1A, stage 1B and distillation losses with their backward pass, on the meta device (see above)."""
    from flowmo_diffusers.training.distillation import distillation_losses, make_student_config
    from flowmo_diffusers.training.losses import flowmo_training_losses

    with torch.device("meta"):
        model = FlowMoModel(**get_preset_config("flowmo-tiny"))
        teacher = FlowMoModel(**get_preset_config("flowmo-tiny"))
    images = torch.zeros(2, 3, 32, 32, device="meta")
    perceptual = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731
    for steps in (None, 2):
        terms = flowmo_training_losses(model, images, FlowMoScheduler(), posttrain_sample_steps=steps,
                                       perceptual_weight=0.1, perceptual_loss=perceptual)
        terms["loss"].backward()
    make_student_config(model, 2)
    terms = distillation_losses(model, teacher, images, perceptual_weight=0.1, perceptual_loss=perceptual)
    terms["loss"].backward()
    assert terms["loss"].device.type == "meta" and model.decoder.proj_out.weight.grad.device.type == "meta"
