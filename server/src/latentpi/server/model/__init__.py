"""pi0 / pi0.5 in JAX/flax: configs, the SigLIP tower, the multi-expert Gemma, flow-matching
sampling, on-device latent capture and checkpoint loading. Import the submodules directly."""
