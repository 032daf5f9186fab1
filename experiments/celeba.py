"""The celeba pipeline: python -m experiments.celeba --workdir=DIR (see configs/celeba.py)."""

from experiments import launch

if __name__ == '__main__':
  launch.run('celeba')
