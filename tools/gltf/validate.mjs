// Prints the Khronos glTF validator's JSON report of a .glb / .gltf file: node tools/gltf/validate.mjs FILE
// (external resources are read from the file's folder). Exit status 0 when the report was printed, whatever it says:
// the callers read report.issues.numErrors / numWarnings.
import { readFile } from "node:fs/promises";
import path from "node:path";
import validator from "gltf-validator";

const file = process.argv[2];
if (!file) {
  console.error("usage: node tools/gltf/validate.mjs FILE.glb");
  process.exit(2);
}
const bytes = new Uint8Array(await readFile(file));
const report = await validator.validateBytes(bytes, {
  uri: path.basename(file),
  externalResourceFunction: (uri) => readFile(path.join(path.dirname(file), decodeURIComponent(uri))),
});
console.log(JSON.stringify(report, null, 2));
