"""A byte-level language model with LAMB on a local text file, sized for a 2-core CPU.

A small decoder-only Transformer (jaxscale/models/transformer.py: 2 blocks of width 128) reads
128 bytes and predicts each next one; LAMB (You et al. 2019, arXiv 1904.00962, who trained
BERT with it), warm-up then cosine decay. Any UTF-8 (or other) file works:
`--config.text_file=PATH`; the default is a license text every Debian system has. Loss and
bits per byte are in metrics.jsonl; uniform bytes are ln 256 = 5.55 nats, 8 bits.
"""
from jaxscale.config import defaults


def get_config():
  config = defaults()
  config.dataset = "text"
  config.text_file = "/usr/share/common-licenses/GPL-3"
  config.sequence_length = 128
  config.task = "language_model"
  config.model = "transformer_tiny"
  config.num_epochs = 30.0
  config.global_batch_size = 32
  config.eval_batch_size = 32
  config.learning_rate = 4e-3
  config.lr_schedule.name = "cosine"
  config.lr_schedule.warmup_epochs = 2.0
  config.optimizer.name = "lamb"
  config.optimizer.weight_decay = 0.01
  config.eval_every_epochs = 10.0
  config.log_every_steps = 25
  return config
