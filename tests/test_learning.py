import torch
from diffusers.training_utils import EMAModel

from mcvd_diffusers import MCVDPipeline, MCVDUNet2DModel, make_noise_scheduler, make_sampler
from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.data.moving_mnist import MovingMNIST
from mcvd_diffusers.losses import diffusion_loss


def test_tiny_model_learns_to_predict_a_moving_digit():
    """One digit bouncing on a 48-px canvas: after 300 steps (about a minute on 2 cores) the
    model's predictions must beat both copying the last past frame and predicting black."""
    torch.manual_seed(0)
    digit = load_mnist("train", root="bundled").images[:1]
    data = MovingMNIST(digit, image_size=48, num_digits=1, num_frames=5)
    unet = MCVDUNet2DModel.from_preset("tiny", sample_size=48, num_past_frames=2, num_current_frames=3)
    scheduler = make_noise_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=2 / 3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = diffusion_loss(unet, scheduler, data.sample(16, generator), generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
    ema.copy_to(unet.parameters())

    clips = data.sample(16, torch.Generator().manual_seed(123))
    past, future = clips[:, :2], clips[:, 2:]
    pipe = MCVDPipeline(unet=unet, scheduler=scheduler)
    pipe.scheduler = make_sampler("ddim", scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    predicted = pipe(past, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).frames
    model_mse = (predicted - future).pow(2).mean().item()
    copy_last_mse = (past[:, -1:] - future).pow(2).mean().item()
    black_mse = future.pow(2).mean().item()
    assert model_mse < copy_last_mse, (model_mse, copy_last_mse)
    assert model_mse < black_mse, (model_mse, black_mse)
