"""One partition per district; the key is the district's stable id (never its name)."""

import dagster as dg

# The name is the partitions' storage identity: never rename it.
districts_partitions = dg.DynamicPartitionsDefinition(name="districts")
