"""Your own model on Fashion-MNIST: `jaxscale-train --config=examples/custom_model/config.py`."""
from jaxscale.config import defaults


def get_config():
  config = defaults()
  config.model = "models:SmallCNN"  # models.py beside this file
  config.dataset = "fashion_mnist"
  config.num_epochs = 1.0
  config.global_batch_size = 128
  config.learning_rate = 0.1
  config.optimizer.weight_decay = 5e-4
  config.random_flip = False
  config.eval_every_epochs = 0.5
  return config
