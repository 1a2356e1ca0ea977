"""ResNet-50 on ImageNet at global batch 81,920 with LARS: the Fujitsu ABCI record.

Yamazaki et al. 2019, "Yet Another Accelerated SGD: ResNet-50 Training on ImageNet in 74.7
seconds" (arXiv 1903.12650): 2,048 V100 GPUs of ABCI, 40 images per GPU, SGD with LARS,
learning-rate warmup, label smoothing, tuned weight decay and BatchNorm momentum, the same seed
on every process instead of a parameter broadcast, gradients packed into buckets and all-reduced
while the backward pass runs, mixed precision. Reported: 75.08% top-1.

What jaxscale sets and why (the paper does not list every value): LARS with trust coefficient
0.001 and momentum 0.9, warmup then polynomial decay of power 2 (the MLPerf LARS form), label
smoothing 0.1, fp16 with dynamic loss scaling, 90 epochs as an upper bound (the record stopped
at its accuracy target), BatchNorm momentum from the few steps per epoch (16 steps per epoch at
this batch: see `bn_momentum`), weight decay 5e-5. Peak learning rate and warmup are starting
points to tune, not the record's values. Same-seed initialization is jaxscale's default.
Added by jaxscale: precise BN over 16 batches at the end (`precise_bn_batches`, README: Large
batches), so that eval does not depend on how far the running averages lag at 16 steps per epoch.
"""
from jaxscale.config import defaults


def get_config():
  config = defaults()
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.model = "resnet50"
  config.precision = "fp16"
  config.global_batch_size = 81920
  config.eval_batch_size = 8192
  config.num_epochs = 90.0
  config.learning_rate = 29.0
  config.lr_scaling = "none"
  config.lr_schedule.name = "poly"
  config.lr_schedule.power = 2.0
  config.lr_schedule.warmup_epochs = 10.0
  config.optimizer.name = "lars"
  config.optimizer.momentum = 0.9
  config.optimizer.trust_coefficient = 0.001
  config.optimizer.weight_decay = 5e-5
  config.label_smoothing = 0.1
  config.bn_momentum = 0.9
  config.precise_bn_batches = 16
  config.log_every_steps = 4
  return config
