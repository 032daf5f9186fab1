"""The cifar10 pipeline: python -m experiments.cifar10 --workdir=DIR (see configs/cifar10.py)."""

from experiments import launch

if __name__ == '__main__':
  launch.run('cifar10')
