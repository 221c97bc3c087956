"""Training: synthetic identity data, the tiny VAE, and the Stand-In trainer (`standin train`).

- `synthetic`: procedurally drawn glyph "identities" and their videos (the tiny preset's data).
- `vae_fit`: fits the tiny VAE to a fixed latent code so that decode inverts encode on that data.
- `tiny_recipe`: the tiny preset's whole run (VAE, base, identity branch) → its shipped weights.
- `trainer`: flow-matching training of the DiT: stage 1 base text-to-video, stage 2 the identity
  branch with the `lora` recipe (the paper's) or `demo` (everything unfrozen + reference dropout).
- `video_folder`: a folder of real clips + face crops, encoded once to latents (real presets).
- `quality`: the held-out identity metrics (regression test, README figure).
- `command`: `standin train`.
"""
