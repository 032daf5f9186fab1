"""The model's mathematics (docs/model.md): canvas, part bank, parser, Gumbel
latents, likelihoods, the composed NP-DRAW and its losses, the bound, sampling,
editing, and the networks (nets/). Nothing here reads or writes files or
imports a stage."""
