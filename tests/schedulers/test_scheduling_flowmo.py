import pytest
import torch

from flowmo_diffusers import FlowMoScheduler


def test_power_grid_matches_paper_sampler():
    scheduler = FlowMoScheduler()
    scheduler.set_timesteps(25)
    expected = torch.tensor([(i / 25) ** 4 for i in range(25, -1, -1)], dtype=torch.float32)
    torch.testing.assert_close(scheduler.sigmas, expected, rtol=0, atol=1e-7)
    assert len(scheduler.timesteps) == 25
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
    guided = [float(t) for t in scheduler.sigmas[:-1] if scheduler.is_guidance_step(t)]
    # EDM sigma (0.17, 1.02) -> t in [0.1453, 0.5050]: 6 of the 25 steps, as in the original (31 decoder passes).
    assert len(guided) == 6
    assert max(guided) == pytest.approx(0.4979, abs=1e-4) and min(guided) == pytest.approx(0.1678, abs=1e-4)


def test_linear_grid_and_no_interval():
    scheduler = FlowMoScheduler(time_schedule="linear", guidance_interval=None)
    scheduler.set_timesteps(4)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert all(scheduler.is_guidance_step(t) for t in scheduler.sigmas)


def test_euler_step_is_original_update():
    scheduler = FlowMoScheduler()
    scheduler.set_timesteps(3)
    sample, velocity = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    t, t_next = scheduler.sigmas[0], scheduler.sigmas[1]
    stepped = scheduler.step(velocity, scheduler.timesteps[0], sample).prev_sample
    assert stepped.dtype == torch.float32  # the state stays float32 under bf16 velocities
    torch.testing.assert_close(stepped, sample - (t - t_next) * velocity.float(), rtol=0, atol=1e-6)


def test_training_noising_and_prediction_are_consistent():
    images, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    times = torch.tensor([0.0, 0.3, 0.7, 1.0])
    noisy = FlowMoScheduler.add_noise_at_times(images, noise, times)
    torch.testing.assert_close(noisy[0], images[0])
    torch.testing.assert_close(noisy[3], noise[3])
    velocity = FlowMoScheduler.velocity_target(images, noise)
    torch.testing.assert_close(FlowMoScheduler.predict_image(noisy, velocity, times), images, rtol=0, atol=1e-6)


@pytest.mark.parametrize("distribution", ["fat_lognormal", "lognormal", "uniform"])
def test_training_time_distributions(distribution):
    scheduler = FlowMoScheduler(training_time_distribution=distribution)
    times = scheduler.sample_training_times(200_000, generator=torch.Generator().manual_seed(0))
    assert times.min() >= 0 and times.max() <= 1
    share_outer = ((times < 0.05) | (times > 0.95)).float().mean().item()
    # uniform: 10%; logit-normal: ~0.3%; fat logit-normal: 0.9 * 0.3% + 0.1 * 10% ~ 1.3%
    expected = {"uniform": 0.10, "lognormal": 0.0031, "fat_lognormal": 0.9 * 0.0031 + 0.1 * 0.10}[distribution]
    assert share_outer == pytest.approx(expected, rel=0.1)
    again = scheduler.sample_training_times(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, scheduler.sample_training_times(8, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("distribution", ["fat_lognormal", "lognormal"])
def test_logit_mean_moves_training_times_towards_noise(distribution):
    generator = torch.Generator().manual_seed(0)
    paper = FlowMoScheduler(training_time_distribution=distribution)
    # Defaults draw exactly the paper's times, so runs made before the option existed reproduce.
    explicit = FlowMoScheduler(training_time_distribution=distribution, logit_mean=0.0, logit_std=1.0)
    assert torch.equal(paper.sample_training_times(64, generator=torch.Generator().manual_seed(3)),
                       explicit.sample_training_times(64, generator=torch.Generator().manual_seed(3)))
    shifted = FlowMoScheduler(training_time_distribution=distribution, logit_mean=3.5, logit_std=0.5)
    times = shifted.sample_training_times(100_000, generator=generator)
    # sigmoid(N(3.5, 0.5)) has its median at sigmoid(3.5) = 0.971; the fat variant adds 10% uniform times.
    assert times.median().item() == pytest.approx(torch.sigmoid(torch.tensor(3.5)).item(), abs=0.01)
    share_low = (times < 0.5).float().mean().item()
    assert share_low == pytest.approx({"lognormal": 0.0, "fat_lognormal": 0.05}[distribution], abs=0.01)


@pytest.mark.parametrize("options", [{"logit_mean": float("nan")}, {"logit_mean": 11.0}, {"logit_std": 0.0},
                                     {"logit_std": "1"}])
def test_bad_logit_options(options):
    with pytest.raises((ValueError, TypeError), match=next(iter(options))):
        FlowMoScheduler(**options)


@pytest.mark.parametrize(
    "options",
    [{}, {"time_schedule": "linear", "guidance_interval": (0.2, 0.9)}, {"guidance_interval": [0.1, 2]},
     {"guidance_interval": None}, {"logit_mean": 3.5, "logit_std": 0.5}],
)
def test_config_round_trip(tmp_path, options):
    scheduler = FlowMoScheduler(**options)
    scheduler.save_pretrained(tmp_path)
    loaded = FlowMoScheduler.from_pretrained(tmp_path)

    def public(config):
        return {key: value for key, value in config.items() if not key.startswith("_")}

    assert public(loaded.config) == public(scheduler.config)
    interval = loaded.config.guidance_interval
    assert interval is None or type(interval) is tuple  # not the list JSON brings back
    assert public(FlowMoScheduler.from_config(loaded.config).config) == public(scheduler.config)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "scheduler_config.json").read_text() == (tmp_path / "scheduler_config.json").read_text()


def test_scale_noise_and_begin_index_forward_the_flow_matching_api():
    scheduler = FlowMoScheduler()
    scheduler.set_timesteps(25)
    images, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    index = 20
    t = scheduler.sigmas[index]
    noised = scheduler.scale_noise(images, scheduler.timesteps[index : index + 1], noise)
    torch.testing.assert_close(noised, (1 - t) * images + t * noise)
    torch.testing.assert_close(noised, FlowMoScheduler.add_noise_at_times(images, noise, t.expand(2)))

    # An image-to-image decode from that time: stepping starts at the begun index.
    scheduler.set_begin_index(index)
    assert scheduler.begin_index == index
    velocity = torch.randn(2, 3, 4, 4)
    stepped = scheduler.step(velocity, scheduler.timesteps[index], noised).prev_sample
    torch.testing.assert_close(stepped, noised + (scheduler.sigmas[index + 1] - t) * velocity, rtol=0, atol=1e-6)
    assert scheduler.step_index == index + 1


def test_bad_options():
    with pytest.raises(ValueError, match="time_schedule"):
        FlowMoScheduler(time_schedule="cosine")
    with pytest.raises(ValueError, match="training_time_distribution"):
        FlowMoScheduler(training_time_distribution="beta")
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowMoScheduler().set_timesteps(0)
