"""The `sample` job: a model file and options -> PNGs. The samplers themselves are in diffcli.diffusion.

    generate.py   the plan of a job (seeds, classes or prompts, names), the model run, the files and records
    edit.py       --init-image and --mask: a starting point and the known region kept at every step
    prompts.py    --prompt, --prompts FILE, --negative-prompt -> token rows
"""
