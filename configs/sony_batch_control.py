"""ResNet-50 on ImageNet with batch-size control, 34K -> 68K: Sony (Mikami et al. 2018).

"ImageNet/ResNet-50 Training in 224 Seconds" (arXiv 1811.05233): 2,176 V100 GPUs, fp16, 2-D
torus all-reduce, and batch-size control: a smaller global batch (34K) while the loss falls
fast, then a doubled one (68K). Reported: 75.03% top-1 in 224 s.

What jaxscale sets: the stages as `batch_schedule="0:34816,30:69632"` (the switch epoch is
jaxscale's assumption, to tune); LARS with warmup and polynomial decay, label smoothing 0.1;
the learning rate follows the square-root rule when the batch doubles (`lr_scaling="sqrt"`
relative to the first stage); fp16 with dynamic loss scaling; hierarchical all-reduce over the
(hosts x local) mesh, jaxscale's counterpart of the 2-D torus. Added by jaxscale: precise BN
over 16 batches of the final 68K at the end (`precise_bn_batches`; 18 steps per epoch there).
"""
from jaxscale.config import defaults


def get_config():
  config = defaults()
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.model = "resnet50"
  config.precision = "fp16"
  config.global_batch_size = 34816
  config.batch_schedule = "0:34816,30:69632"
  config.eval_batch_size = 8192
  config.num_epochs = 90.0
  config.learning_rate = 20.0
  config.lr_scaling = "sqrt"
  config.reference_batch_size = 34816
  config.lr_schedule.name = "poly"
  config.lr_schedule.warmup_epochs = 5.0
  config.optimizer.name = "lars"
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-5
  config.label_smoothing = 0.1
  config.precise_bn_batches = 16
  config.mesh = "hosts"
  config.log_every_steps = 5
  return config
