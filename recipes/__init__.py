"""The recipes that ship with lisa-peft, installed as `lisa_peft.bundled_recipes`.

`lisa-peft recipes` lists them; `lisa-peft train NAME` and `lisa-peft demo --recipe NAME` accept a name
from that list as well as a path. `accelerate/` holds launch configs for `accelerate launch`.
"""
