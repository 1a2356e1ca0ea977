"""Your own model and NumPy arrays, from Python: `python examples/custom_model/train_numpy.py`.

The same Fashion-MNIST images, read into arrays here to stand for data of your own; the model is
passed as a Python object and the arrays as (x, y).
"""
import sys

from jaxscale import config as config_lib, train
from jaxscale.data import fashion_mnist

from models import SmallCNN


def main(workdir: str = "workdirs/custom_numpy", steps: int = 200) -> dict:
  x_train = fashion_mnist.read_idx("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
  y_train = fashion_mnist.read_idx("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
  x_test = fashion_mnist.read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
  y_test = fashion_mnist.read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
  config = config_lib.defaults()
  config.num_train_steps = steps
  config.global_batch_size = 128
  config.random_flip = False
  return train.run(config, workdir, model=SmallCNN,
                   train=(x_train, y_train), eval=(x_test, y_test))


if __name__ == "__main__":
  result = main(*sys.argv[1:2])
  print(f"test accuracy {result['accuracy']:.4f}")
