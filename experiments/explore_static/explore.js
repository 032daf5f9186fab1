// The explorer's page: holds one drawing, asks the server to render it after
// every change, and shows the canvas and decoded image after the chosen step.
'use strict';

const page = {info: null, view: null, step: 0, renders: 0};
const $ = (id) => document.getElementById(id);

async function post(path, body) {
  const response = await fetch(path, {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) {
    const detail = typeof answer.detail === 'string' ? answer.detail : JSON.stringify(answer.detail);
    throw new Error(detail);
  }
  return answer;
}

// Runs a request that returns a view; shows it, or the server's message.
async function load(path, body, step) {
  try {
    const view = await post(path, body);
    page.view = view;
    page.step = step === undefined ? view.pres.length - 1 : Math.min(step, view.pres.length - 1);
    $('error').textContent = '';
    show();
  } catch (error) {
    $('error').textContent = error.message;
  }
  page.renders += 1;
  document.body.dataset.renders = page.renders;
}

function drawingOf(view) {
  return {pres: [...view.pres], where: [...view.where], what: [...view.what]};
}

// Renders the shown drawing after change; shows `step` once it has come back.
function rerender(change, step = page.step) {
  const drawing = drawingOf(page.view);
  change(drawing);
  return load('/api/render', drawing, step);
}

function show() {
  const view = page.view, t = page.step, info = page.info;
  $('slider').max = view.pres.length;
  $('slider').value = t + 1;
  $('step-label').textContent = `${t + 1} of ${view.pres.length}`;
  $('canvas').src = view.canvases[t];
  $('decoded').src = view.decoded[t];
  $('drawn').checked = view.pres[t];
  $('step-part').textContent = view.what[t];
  $('step-where').textContent = view.where[t];
  $('summary').textContent = `${view.pres.filter((p) => p).length} steps drawn`;
  $('add-step').disabled = view.pres.length >= info.max_steps;  // The server's cap.
  const scale = 256 / info.canvas_size;
  const row = Math.floor(view.where[t] / info.grid_side) * info.stride;
  const col = (view.where[t] % info.grid_side) * info.stride;
  const box = $('step-box');
  box.style.top = `${row * scale}px`;
  box.style.left = `${col * scale}px`;
  box.style.width = `${Math.min(info.patch_size, info.canvas_size - col) * scale}px`;
  box.style.height = `${Math.min(info.patch_size, info.canvas_size - row) * scale}px`;
  box.style.display = view.pres[t] ? 'block' : 'none';
  for (const img of $('parts').children) {
    img.classList.toggle('chosen', Number(img.dataset.part) === view.what[t]);
  }
  const sources = $('sources');
  sources.replaceChildren();
  for (const [name, url] of Object.entries(view.sources)) {
    const img = document.createElement('img');
    img.src = url;
    img.className = 'pixels';
    img.title = name;
    img.id = `source-${name}`;
    sources.append(img);
  }
}

// The location whose (clipped) box centre is nearest to a canvas pixel.
function locationAt(x, y) {
  const info = page.info;
  let best = 0, bestDistance = Infinity;
  for (let g = 0; g < info.grid_side * info.grid_side; g++) {
    const row = Math.floor(g / info.grid_side) * info.stride, col = (g % info.grid_side) * info.stride;
    const cy = (row + Math.min(row + info.patch_size, info.canvas_size)) / 2;
    const cx = (col + Math.min(col + info.patch_size, info.canvas_size)) / 2;
    const distance = (cx - x) ** 2 + (cy - y) ** 2;
    if (distance < bestDistance) [best, bestDistance] = [g, distance];
  }
  return best;
}

async function start() {
  page.info = await (await fetch('/api/info')).json();
  const info = page.info;
  for (const part of info.parts) {
    const img = document.createElement('img');
    img.src = part.url;
    img.className = 'pixels';
    img.dataset.part = part.index;
    img.title = `part ${part.index}`;
    img.addEventListener('click', () => rerender((d) => { d.what[page.step] = part.index; d.pres[page.step] = true; }));
    $('parts').append(img);
  }
  for (const name of info.regions) {
    const option = document.createElement('option');
    option.value = name;
    $('regions').append(option);
  }
  $('encode').addEventListener('click', () => load('/api/test_image', {index: Number($('image-index').value)}));
  $('sample').addEventListener('click', () => {
    const topK = $('top-k').value;
    load('/api/sample', {
      seed: Number($('seed').value),
      temperature: Number($('temperature').value),
      top_k: topK === '' ? null : Number(topK),
    });
  });
  $('swap').addEventListener('click', () => load('/api/swap', {
    a: Number($('swap-a').value), b: Number($('swap-b').value), region: $('region').value,
  }));
  $('slider').addEventListener('input', () => { page.step = Number($('slider').value) - 1; show(); });
  $('drawn').addEventListener('change', () => rerender((d) => { d.pres[page.step] = $('drawn').checked; }));
  $('add-step').addEventListener('click', () => {
    const t = page.step;
    rerender((d) => { d.pres.push(true); d.where.push(d.where[t]); d.what.push(d.what[t]); },
      page.view.pres.length);
  });
  $('canvas-box').addEventListener('click', (event) => {
    const rect = $('canvas-box').getBoundingClientRect();
    const scale = info.canvas_size / rect.width;
    const where = locationAt((event.clientX - rect.left) * scale, (event.clientY - rect.top) * scale);
    rerender((d) => { d.where[page.step] = where; d.pres[page.step] = true; });
  });
  if (info.num_test_images === null) {
    // The run's data is missing: the page samples, renders and edits, without test images.
    for (const id of ['image-index', 'encode', 'swap-a', 'swap-b', 'swap']) $(id).disabled = true;
    await load('/api/sample', {seed: 0, temperature: 1.0, top_k: null});
    $('error').textContent = info.data_error;
    return;
  }
  for (const id of ['image-index', 'swap-a', 'swap-b']) $(id).max = info.num_test_images - 1;
  await load('/api/test_image', {index: 0});
}

start();
