// Runs a wasm32-wasip1 command module under Node's WASI, in V8 with TurboFan only (as Envoy runs
// the filter: --no-liftoff). Imports the module has beyond WASI (the proxy-wasm host functions
// the filter links but a benchmark never calls) are bound to functions that return 0.
//
//   node --no-liftoff tests/bench/wasi-run.mjs MODULE.wasm [ARGS...]
import { readFile } from 'node:fs/promises';
import { argv } from 'node:process';
import { WASI } from 'node:wasi';

const wasi = new WASI({ version: 'preview1', args: argv.slice(2), env: {} });
const module = await WebAssembly.compile(await readFile(argv[2]));
const imports = wasi.getImportObject();
for (const imp of WebAssembly.Module.imports(module)) {
  imports[imp.module] ??= {};
  imports[imp.module][imp.name] ??= () => 0;
}
const instance = await WebAssembly.instantiate(module, imports);
// The filter's crate is also a reactor (proxy-wasm exports `_initialize`); WASI's start() wants a
// command's exports only.
const { _initialize, ...exports } = instance.exports;
wasi.start({ exports });
