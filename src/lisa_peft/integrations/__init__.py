"""How LiSA plugs into the Hugging Face stack, around the tuner.

* `registration`: the PEFT method ``LISA`` (peft_type, tuner, config, save/load mapping);
* `patching`: wrapping library methods once, restorable;
* `mixed`, `task_types`: guards for mixed adapters and task types LiSA does not take;
* `hub`: adapter cards, `push_to_hub`, `from_pretrained` with clear errors;
* `loading`: guards that keep a LiSA checkpoint (adapter or compact folder) from loading silently wrong.

Nothing here is imported at package import; `import lisa_peft` installs what it needs.
"""
