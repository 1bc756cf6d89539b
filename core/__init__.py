"""The ground layer every other package may import: flow-matching maths (`flow`), seeds and per-sample random
draws (`seeding`), typed YAML loading and project paths (`recipe_loader`), the prompt vocabulary (`vocabulary`) and
peft helpers (`lora`). It imports nothing from `teachers`, `students`, `synth_data` or `distill`."""
