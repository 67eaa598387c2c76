# python -I -B -c <this> <bootstrap compiled by the parent's interpreter, marshalled, hex> <config>
import marshal, sys
if __name__ == "__main__":
    exec(marshal.loads(bytes.fromhex(sys.argv.pop(1))))
