"""python -m fqjax.data.utkface --manual_dir M --data_dir D --image_size 64"""
from fqjax.data.utkface.builder import main

if __name__ == "__main__":
  main()
