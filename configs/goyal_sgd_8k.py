"""ResNet-50 on ImageNet at global batch 8,192 with SGD: Goyal et al. 2017 (arXiv 1706.02677).

"Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour": 256 P100 GPUs, 32 images per GPU,
momentum SGD, learning rate 0.1 x k/256 (linear scaling rule), gradual warmup over 5 epochs from
0.1 to 3.2, divided by 10 at epochs 30, 60 and 80, 90 epochs, weight decay 1e-4, the last
BatchNorm scale of each residual block initialized to zero, BatchNorm statistics per GPU of 32
images. Reported: 76.3% top-1.

Changed for jaxscale: `bn_group_size=1` reproduces per-device statistics only when each device
holds 32 images (256 devices here); with fewer, larger devices set it so that a group holds about
32 images. Weight decay skips biases and BatchNorm parameters (jaxscale's default mask); the
paper decays all of them. Prepare imagenet2012 first (README: Datasets).
"""
from jaxscale.config import defaults


def get_config():
  config = defaults()
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.model = "resnet50"
  config.zero_init_last_bn = True
  config.bn_group_size = 1
  config.global_batch_size = 8192
  config.eval_batch_size = 2048
  config.num_epochs = 90.0
  config.learning_rate = 0.1
  config.reference_batch_size = 256
  config.lr_scaling = "linear"
  config.lr_schedule.name = "steps"
  config.lr_schedule.warmup_epochs = 5.0
  config.lr_schedule.boundaries_epochs = (30.0, 60.0, 80.0)
  config.lr_schedule.decay_factor = 0.1
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 1e-4
  config.log_every_steps = 20
  return config
