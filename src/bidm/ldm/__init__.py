"""Latent diffusion (LDM-4 Bedrooms / FFHQ, LDM-8 Churches): the openaimodel UNet (`bidm.ldm.unet`), the frozen
VQ/KL first stage (`bidm.ldm.first_stage`), official checkpoint reading (`bidm.ldm.official`) and training on
latents (`bidm.ldm.latents`)."""
