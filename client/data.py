from fedpref.simulations.data import *  # TEMP shim
from fedpref.simulations.data import PreferencePair, UserData, Split, load_jsonl, group_by_user, write_jsonl
