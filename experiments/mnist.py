"""The mnist pipeline: python -m experiments.mnist --workdir=DIR (see configs/mnist.py)."""

from experiments import launch

if __name__ == '__main__':
  launch.run('mnist')
