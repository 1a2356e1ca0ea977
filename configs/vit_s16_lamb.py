"""ViT-S/16 on ImageNet with LAMB at global batch 4,096.

After big_vision's plain ViT-S/16 baseline (Beyer et al. 2022, arXiv 2205.01580: batch 1,024,
90 epochs, Adam, learning rate 1e-3, weight decay 1e-4, 10k warm-up steps, cosine) with the
layer-wise adaptive LAMB optimizer of You et al. 2019 (arXiv 1904.00962) for a larger batch.

What jaxscale changed: LAMB instead of Adam, batch 4,096 with the square-root learning-rate rule
from the baseline's 1e-3 at 1,024 (so 2e-3), weight decay 0.1 (LAMB's decoupled decay),
5 warm-up epochs, label smoothing 0.1, bf16 compute. Not reproduced: RandAugment and Mixup.
"""
from jaxscale.config import defaults


def get_config():
  config = defaults()
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.model = "vit_s16"
  config.precision = "bf16"
  config.global_batch_size = 4096
  config.eval_batch_size = 4096
  config.num_epochs = 90.0
  config.learning_rate = 1e-3
  config.reference_batch_size = 1024
  config.lr_scaling = "sqrt"
  config.lr_schedule.name = "cosine"
  config.lr_schedule.warmup_epochs = 5.0
  config.optimizer.name = "lamb"
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 0.1
  config.label_smoothing = 0.1
  config.log_every_steps = 20
  return config
