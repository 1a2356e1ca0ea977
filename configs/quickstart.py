"""Quickstart: a small-stem ResNet-8 on Fashion-MNIST, sized for a 2-core CPU.

Three stages of one basic block (widths 16/32/64), SGD with Nesterov momentum, a short linear
warm-up then cosine decay, random horizontal flips. README states what it measured.
"""
from jaxscale.config import defaults


def get_config():
  config = defaults()
  config.dataset = "fashion_mnist"
  config.model = "resnet8"
  config.num_epochs = 4.0
  config.global_batch_size = 128
  config.learning_rate = 0.2
  config.lr_schedule.name = "cosine"
  config.lr_schedule.warmup_epochs = 0.5
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-4
  config.bn_momentum = 0.9
  config.log_every_steps = 100
  return config
