"""transformers model classes of lisa-peft (registered with the Auto classes on `import lisa_peft`)."""
