"""Input: datasets by name or from arrays, the training stream, exact eval."""
from jaxscale.data.arrays import ArraySource, from_arrays, mean_std
from jaxscale.data.pipeline import TrainLoader, eval_batches, num_eval_batches
from jaxscale.data.sources import Dataset, check_config, load_dataset
from jaxscale.data.transforms import EvalTransform, TrainTransform

__all__ = ["ArraySource", "Dataset", "EvalTransform", "TrainLoader", "TrainTransform",
           "check_config", "eval_batches", "from_arrays", "load_dataset", "mean_std",
           "num_eval_batches"]
