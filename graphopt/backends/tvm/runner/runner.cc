// tvm_runner: run the "main" function of a Relax VM library on raw tensor files.
//
//   tvm_runner MODEL.so OUT_DIR [--require FEATURE]... INPUT...
//
// MODEL.so is a library written by relax.VMExecutable.export_library (for graphopt's aarch64
// target: cross-compiled with aarch64-linux-gnu-g++). Each INPUT is `path:dtype:d0xd1x...`: a
// file of raw little-endian C-contiguous data, a TVM dtype name (float32, float16, bfloat16,
// int64, int32, int8, uint8, bool, ...) and the shape (`scalar` or nothing for 0-d). The path
// may itself contain ':' (the last two fields are split off from the right).
//
// `--require FEATURE` (sve, sve2, asimd/neon, fp16, dotprod, i8mm, bf16, sme) checks the CPU's
// hwcaps before the model is loaded, so a library built for a feature this core lacks fails with
// a clear message instead of SIGILL somewhere inside a kernel.
//
// Outputs: main's result (a tuple of tensors, possibly nested, or a single tensor) is flattened
// into OUT_DIR/output<i>.bin (raw C-contiguous bytes), and OUT_DIR/outputs.txt, written last
// (temp file + rename), lists one line per output: `output<i>.bin DTYPE d0xd1x...` (`scalar`
// for 0-d).
//
// Exit codes: 0 ok, 1 runtime error (loading, running, I/O), 2 bad command line or input,
// 3 a required CPU feature is missing. Every error prints one `tvm_runner: ...` line on stderr.
//
// Built by build.sh against libtvm_ffi.so and libtvm_runtime.so (the latter is only linked
// so that it registers the ".so" module loader and the Relax VM: -Wl,--no-as-needed).

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cstdint>
#include <exception>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace ffi = tvm::ffi;

namespace {

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitMissingFeature = 3;

// An error with the exit code main() returns for it.
struct RunnerError : std::runtime_error {
  int code;
  RunnerError(int code, const std::string& message) : std::runtime_error(message), code(code) {}
};

[[noreturn]] void Fail(int code, const std::string& message) { throw RunnerError(code, message); }

const char kUsage[] =
    "usage: tvm_runner MODEL.so OUT_DIR [--require FEATURE]... INPUT...\n"
    "  INPUT: path:dtype:d0xd1x... (raw little-endian C-contiguous data; shape `scalar` or\n"
    "         empty for 0-d), e.g. x.bin:float32:1x3x224x224\n"
    "  FEATURE: sve, sve2, asimd (neon), fp16, dotprod, i8mm, bf16, sme\n";

// ------------------------------------------------------------------------------------------
// CPU features

struct Feature {
  const char* name;
  int hwcap;  // 1 = AT_HWCAP, 2 = AT_HWCAP2
  uint64_t bit;
};

// Bits from the Linux kernel's arch/arm64/include/uapi/asm/hwcap.h (spelled out so the runner
// builds against any kernel headers).
const Feature kFeatures[] = {
    {"asimd", 1, 1ULL << 1},   {"neon", 1, 1ULL << 1},     {"fp16", 1, 1ULL << 10},
    {"dotprod", 1, 1ULL << 20}, {"sve", 1, 1ULL << 22},     {"sve2", 2, 1ULL << 1},
    {"i8mm", 2, 1ULL << 13},   {"bf16", 2, 1ULL << 14},    {"sme", 2, 1ULL << 23},
};

const Feature* FindFeature(const std::string& name) {
  for (const Feature& f : kFeatures) {
    if (name == f.name) return &f;
  }
  return nullptr;
}

void CheckFeatures(const std::vector<std::string>& required) {
  for (const std::string& name : required) {
    std::string bare = !name.empty() && name[0] == '+' ? name.substr(1) : name;  // "+sve" too
    const Feature* feature = FindFeature(bare);
    if (feature == nullptr) {
      std::string known;
      for (const Feature& f : kFeatures) known += std::string(known.empty() ? "" : ", ") + f.name;
      Fail(kExitUsage, "--require " + name + ": unknown CPU feature (known: " + known + ")");
    }
#if defined(__aarch64__) && defined(__linux__)
    uint64_t caps = getauxval(feature->hwcap == 1 ? AT_HWCAP : AT_HWCAP2);
    if ((caps & feature->bit) == 0) {
      Fail(kExitMissingFeature, "this library was built for +" + bare +
                                    " but this CPU does not have " + bare);
    }
#else
    Fail(kExitMissingFeature, "--require " + bare +
                                  ": CPU features can only be checked on aarch64 Linux");
#endif
  }
}

// ------------------------------------------------------------------------------------------
// Inputs

struct Input {
  std::string spec, path;
  DLDataType dtype;
  std::vector<int64_t> shape;
};

std::string ShapeString(const int64_t* shape, int ndim) {
  if (ndim == 0) return "scalar";
  std::string s;
  for (int i = 0; i < ndim; ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return s;
}

DLDataType ParseDType(const std::string& name, const std::string& where) {
  if (name.empty()) Fail(kExitUsage, where + ": missing dtype");
  DLDataType dtype;
  try {
    dtype = ffi::StringToDLDataType(ffi::String(name));
  } catch (const std::exception&) {
    Fail(kExitUsage, where + ": unknown dtype '" + name + "'");
  }
  if (dtype.lanes != 1 || dtype.bits == 0 || dtype.bits % 8 != 0) {
    Fail(kExitUsage, where + ": dtype '" + name + "' is not a byte-sized scalar type");
  }
  return dtype;
}

std::vector<int64_t> ParseShape(const std::string& text, const std::string& where) {
  std::vector<int64_t> shape;
  if (text.empty() || text == "scalar") return shape;
  size_t start = 0;
  while (true) {
    size_t end = text.find('x', start);
    std::string dim = text.substr(start, end == std::string::npos ? std::string::npos
                                                                  : end - start);
    if (dim.empty() || dim.find_first_not_of("0123456789") != std::string::npos ||
        dim.size() > 15) {
      Fail(kExitUsage, where + ": bad shape '" + text + "' (expected d0xd1x... or scalar)");
    }
    shape.push_back(std::stoll(dim));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return shape;
}

Input ParseInput(const std::string& spec, size_t index) {
  std::string where = "input " + std::to_string(index) + " '" + spec + "'";
  size_t shape_colon = spec.rfind(':');
  if (shape_colon == std::string::npos || shape_colon == 0) {
    Fail(kExitUsage, where + ": expected path:dtype:shape");
  }
  size_t dtype_colon = spec.rfind(':', shape_colon - 1);
  if (dtype_colon == std::string::npos || dtype_colon == 0) {
    Fail(kExitUsage, where + ": expected path:dtype:shape");
  }
  Input input;
  input.spec = spec;
  input.path = spec.substr(0, dtype_colon);
  input.dtype = ParseDType(spec.substr(dtype_colon + 1, shape_colon - dtype_colon - 1), where);
  input.shape = ParseShape(spec.substr(shape_colon + 1), where);
  return input;
}

// 64-byte aligned host memory: TVM's kernels assume aligned buffers.
struct AlignedCPUAlloc {
  void AllocData(DLTensor* tensor) {
    size_t size = ffi::GetDataSize(*tensor);
    void* ptr = nullptr;
    if (posix_memalign(&ptr, 64, size == 0 ? 64 : (size + 63) / 64 * 64) != 0) {
      throw std::bad_alloc();
    }
    tensor->data = ptr;
  }
  void FreeData(DLTensor* tensor) { free(tensor->data); }
};

ffi::Tensor LoadInput(const Input& input, size_t index) {
  std::string where = "input " + std::to_string(index) + " (" + input.path + ")";
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(
      AlignedCPUAlloc(), ffi::ShapeView(input.shape.data(), input.shape.size()), input.dtype,
      DLDevice{kDLCPU, 0});
  size_t expected = ffi::GetDataSize(*tensor.GetDLTensorPtr());
  std::ifstream file(input.path, std::ios::binary | std::ios::ate);
  if (!file) Fail(kExitUsage, where + ": cannot open: " + strerror(errno));
  std::streamoff size = file.tellg();
  if (size < 0 || static_cast<size_t>(size) != expected) {
    Fail(kExitUsage, where + ": holds " + std::to_string(size) + " bytes but " +
                         ffi::DLDataTypeToString(input.dtype).operator std::string() + " " +
                         ShapeString(input.shape.data(), input.shape.size()) + " needs " +
                         std::to_string(expected));
  }
  file.seekg(0);
  if (expected > 0 && !file.read(static_cast<char*>(tensor.data_ptr()), expected)) {
    Fail(kExitError, where + ": read failed");
  }
  return tensor;
}

// ------------------------------------------------------------------------------------------
// Outputs

void Flatten(const ffi::Any& value, const std::string& where, std::vector<ffi::Tensor>* out) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    out->push_back(*tensor);
  } else if (auto array = value.as<ffi::Array<ffi::Any>>()) {
    for (size_t i = 0; i < array->size(); ++i) {
      Flatten((*array)[i], where + "[" + std::to_string(i) + "]", out);
    }
  } else {
    Fail(kExitError, "main returned a " + value.GetTypeKey() + " at " + where +
                         "; the runner writes tensors only");
  }
}

void WriteFile(const std::string& path, const void* data, size_t size) {
  FILE* file = fopen(path.c_str(), "wb");
  if (file == nullptr) Fail(kExitError, "cannot write " + path + ": " + strerror(errno));
  bool ok = size == 0 || fwrite(data, 1, size, file) == size;
  int saved = errno;
  if (fclose(file) != 0 && ok) {
    ok = false;
    saved = errno;
  }
  if (!ok) Fail(kExitError, "cannot write " + path + ": " + strerror(saved));
}

void WriteOutputs(const std::vector<ffi::Tensor>& outputs, const std::string& out_dir) {
  std::ostringstream listing;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const DLTensor* t = outputs[i].GetDLTensorPtr();
    std::string name = "output" + std::to_string(i) + ".bin";
    if (t->device.device_type != kDLCPU) {
      Fail(kExitError, "output " + std::to_string(i) + " is not on the CPU (device type " +
                           std::to_string(t->device.device_type) + ")");
    }
    if (!ffi::IsContiguous(*t)) {
      Fail(kExitError, "output " + std::to_string(i) + " is not C-contiguous");
    }
    size_t size = ffi::GetDataSize(*t);
    WriteFile(out_dir + "/" + name, static_cast<const char*>(t->data) + t->byte_offset, size);
    listing << name << " " << ffi::DLDataTypeToString(t->dtype).operator std::string() << " "
            << ShapeString(t->shape, t->ndim) << "\n";
  }
  std::string text = listing.str();
  std::string tmp = out_dir + "/outputs.txt.tmp";
  WriteFile(tmp, text.data(), text.size());
  if (rename(tmp.c_str(), (out_dir + "/outputs.txt").c_str()) != 0) {
    Fail(kExitError, "cannot rename " + tmp + ": " + strerror(errno));
  }
}

// ------------------------------------------------------------------------------------------
// The VM

ffi::Function GetFunction(const ffi::Module& mod, const std::string& name,
                          const std::string& what) {
  ffi::Optional<ffi::Function> f = mod->GetFunction(ffi::String(name), true);
  if (!f.has_value()) Fail(kExitError, what + " has no function '" + name + "'");
  return *f;
}

std::string DescribeError(const ffi::Error& e) { return e.kind() + ": " + e.message(); }

int Run(int argc, char** argv) {
  std::vector<std::string> positional, required;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (arg == "--require") {
      if (i + 1 >= argc) Fail(kExitUsage, "--require needs a FEATURE");
      required.push_back(argv[++i]);
    } else if (arg.rfind("--require=", 0) == 0) {
      required.push_back(arg.substr(10));
    } else if (arg.rfind("--", 0) == 0) {
      Fail(kExitUsage, "unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 2) Fail(kExitUsage, std::string("missing arguments\n") + kUsage);
  const std::string model_path = positional[0], out_dir = positional[1];

  CheckFeatures(required);  // before the library (and its instructions) is loaded

  std::vector<Input> inputs;
  for (size_t i = 2; i < positional.size(); ++i) inputs.push_back(ParseInput(positional[i], i - 2));

  // dlopen searches the library path for a name without '/': pass an absolute path.
  char* resolved = realpath(model_path.c_str(), nullptr);
  if (resolved == nullptr) Fail(kExitUsage, "model " + model_path + ": " + strerror(errno));
  const std::string model_abs = resolved;
  free(resolved);
  if (mkdir(out_dir.c_str(), 0777) != 0 && errno != EEXIST) {
    Fail(kExitError, "cannot create output folder " + out_dir + ": " + strerror(errno));
  }

  ffi::Module lib = [&] {
    try {
      return ffi::Module::LoadFromFile(ffi::String(model_abs));
    } catch (const ffi::Error& e) {
      Fail(kExitError, "cannot load " + model_path + ": " + DescribeError(e));
    }
  }();
  ffi::Module vm = GetFunction(lib, "vm_load_executable", model_path + " (not a Relax VM "
                                                                        "library?)")()
                       .cast<ffi::Module>();
  // Like python's relax.VirtualMachine(lib, tvm.cpu()): (device type, index, allocator) per
  // device; allocator 2 is the pooled allocator.
  constexpr int kPooledAllocator = 2;
  GetFunction(vm, "vm_initialization", "the VM")(static_cast<int>(kDLCPU), 0, kPooledAllocator);

  int64_t arity = -1;
  try {
    arity = GetFunction(vm, "get_function_arity", "the VM")("main").cast<int64_t>();
  } catch (const ffi::Error& e) {
    Fail(kExitError, model_path + " has no Relax function 'main': " + DescribeError(e));
  }
  if (arity >= 0 && static_cast<size_t>(arity) != inputs.size()) {
    std::string names;
    ffi::Function param_name = GetFunction(vm, "get_function_param_name", "the VM");
    for (int64_t i = 0; i < arity; ++i) {
      names += (i ? ", " : "") + param_name("main", i).cast<ffi::String>().operator std::string();
    }
    Fail(kExitUsage, "main takes " + std::to_string(arity) + " inputs (" + names + ") but " +
                         std::to_string(inputs.size()) + " were given");
  }

  std::vector<ffi::Tensor> tensors;
  for (size_t i = 0; i < inputs.size(); ++i) tensors.push_back(LoadInput(inputs[i], i));

  ffi::Function main_fn = GetFunction(vm, "main", "the VM");
  std::vector<ffi::AnyView> args(tensors.begin(), tensors.end());
  ffi::Any result;
  try {
    main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  } catch (const ffi::Error& e) {
    Fail(kExitError, "main failed: " + DescribeError(e));
  }

  std::vector<ffi::Tensor> outputs;
  Flatten(result, "result", &outputs);
  WriteOutputs(outputs, out_dir);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const RunnerError& e) {
    std::cerr << "tvm_runner: " << e.what() << std::endl;
    return e.code;
  } catch (const ffi::Error& e) {
    std::cerr << "tvm_runner: " << DescribeError(e) << std::endl;
    return kExitError;
  } catch (const std::exception& e) {
    std::cerr << "tvm_runner: " << e.what() << std::endl;
    return kExitError;
  } catch (...) {
    std::cerr << "tvm_runner: unknown error" << std::endl;
    return kExitError;
  }
}
