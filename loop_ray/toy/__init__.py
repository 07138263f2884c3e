"""The embedded world: a prompt grammar (grammar), a renderer of its scenes (render), a binding
reward from pixels (reward, registered as `toy_binding`), a word-level tokenizer (tokenizer), a
small pixel-space text-to-image diffusion model in the diffusers layout (model) and its
pre-training (pretrain, `loop-ray pretrain-toy`). The committed model is loop_ray/assets/toy_model/."""
