"""Per-request latency of the explorer page's server (experiments/explore.py).

  python -m benchmarks.explore_latency [--workdir=runs/mnist] [--requests=20]

Serves the run on a free local port (uvicorn in a thread), then times, after
one warm-up request each, the requests the page sends: a part change
(/api/render, the whole drawing re-rendered and every step decoded), a test
image (/api/test_image), a prior sample (/api/sample) and a region swap
(/api/swap). Prints the median and the slowest of each and appends them to
benchmarks/RESULTS.md.
"""

import json
import socket
import statistics
import threading
import time
import urllib.request

import uvicorn
from absl import app, flags

from benchmarks import results
from experiments import explore
from npdraw_jax import api

flags.DEFINE_string('workdir', 'runs/mnist', 'A finished run directory.')
flags.DEFINE_integer('requests', 20, 'Timed requests of each kind.')


def post(url: str, body: dict) -> dict:
  request = urllib.request.Request(
    url, json.dumps(body).encode(), {'Content-Type': 'application/json'}
  )
  with urllib.request.urlopen(request, timeout=60) as response:
    return json.load(response)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  run = api.load_run(FLAGS.workdir)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(
    uvicorn.Config(explore.make_app(run), host='127.0.0.1', port=port, log_level='warning')
  )
  threading.Thread(target=server.run, daemon=True).start()
  while not server.started:
    time.sleep(0.1)
  url = f'http://127.0.0.1:{port}'
  view = post(url + '/api/test_image', {'index': 0})
  drawing = {k: view[k] for k in ('pres', 'where', 'what')}

  def part_change(i):
    changed = {k: list(v) for k, v in drawing.items()}
    changed['what'][i % len(changed['what'])] = i % run.num_parts
    changed['pres'][i % len(changed['pres'])] = True
    return url + '/api/render', changed

  kinds = {
    'part change (/api/render)': part_change,
    'test image (/api/test_image)': lambda i: (url + '/api/test_image', {'index': i}),
    'prior sample (/api/sample)': lambda i: (url + '/api/sample', {'seed': i}),
    'region swap (/api/swap)': lambda i: (
      url + '/api/swap',
      {'a': i, 'b': i + 1, 'region': 'top'},
    ),
  }
  rows = []
  for name, request in kinds.items():
    post(*request(0))  # Warm-up: compiles what the first request of a kind needs.
    seconds = []
    for i in range(1, FLAGS.requests + 1):
      start = time.perf_counter()
      post(*request(i))
      seconds.append(time.perf_counter() - start)
    rows.append(f'| {name} | {1000 * statistics.median(seconds):.0f} | {1000 * max(seconds):.0f} |')
    print(rows[-1], flush=True)
  server.should_exit = True
  steps = len(drawing['pres'])
  results.append_section(
    'Explorer latency',
    [
      f'`python -m benchmarks.explore_latency --workdir={FLAGS.workdir} '
      f'--requests={FLAGS.requests}`: wall time of one request from a local client '
      f'(the page shows T = {steps} steps, each decoded), after one warm-up request of each kind.',
      '',
      '| request | median ms | slowest ms |',
      '|---|---|---|',
      *rows,
    ],
  )


if __name__ == '__main__':
  app.run(main)
