"""PEFT tuners shipped by lisa_peft."""
