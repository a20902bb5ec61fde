#!/usr/bin/env python3
"""Validate a JSON document against a JSON schema: check_json_schema.py SCHEMA FILE (or - for stdin)."""
import json
import sys

import jsonschema

schema = json.load(open(sys.argv[1]))
doc = json.load(sys.stdin if sys.argv[2] == "-" else open(sys.argv[2]))
jsonschema.validate(doc, schema)
print(f"{sys.argv[2]}: valid against {sys.argv[1]}")
